"""The encoder-decoder Transformer of Vaswani et al. 2017 ("Attention Is All You Need").

Shared source/target embedding tied to the output projection (section 3.4, embeddings scaled by sqrt(d_model)),
sinusoidal positions (3.5), post-norm residual blocks with dropout (5.4). ``construct`` returns logits; ``encode`` and
``decode`` are separate cells' worth of work for greedy / beam-search decoding (:mod:`ms_llm.models.seq2seq_decode`).
"""
from __future__ import annotations

import math

import mindspore as ms
from mindspore import nn, ops

from ..layers.block import TransformerBlock
from ..layers.common import dropout, ms_dtype
from ..layers.embedding import Embedding, SinusoidalPositions
from ..layers.linear import BLAS_MIN_ROWS, Linear, blas_product
from ..layers.norm import make_norm
from .outputs import NamedOutputs


class Seq2SeqEmbedding(nn.Cell):
    """Token embedding (shared by encoder and decoder) * sqrt(d) + positions, then dropout."""

    def __init__(self, cfg, tokens: Embedding):
        super().__init__()
        self.tokens = tokens
        self.scale = math.sqrt(cfg.hidden_size) if cfg.scale_embeddings else 1.0
        self.use_positions = cfg.position_embedding in ("sinusoidal", "learned")
        if cfg.position_embedding == "sinusoidal":
            self.positions = SinusoidalPositions(cfg.max_position_embeddings, cfg.hidden_size)
        elif cfg.position_embedding == "learned":
            self.positions = Embedding(cfg.max_position_embeddings, cfg.hidden_size, cfg.initializer_range, "seq")
        else:
            self.positions = None
        self.drop = dropout(cfg.dropout)

    def construct(self, ids, positions):
        x = self.tokens(ids) * self.scale                                  # (B, S, H)
        if self.use_positions:
            x = x + self.positions(positions)                              # (B, S, H)
        return self.drop(x)


class Stack(nn.Cell):
    """A stack of blocks (+ final norm for pre-norm models); returns (hidden, summed aux loss)."""

    def __init__(self, cfg, blocks, final_norm: bool):
        super().__init__()
        self.blocks = nn.CellList(blocks)
        self.final_norm = make_norm(cfg) if final_norm else None
        self.zero = ms.Tensor(0.0, ms.float32)

    def construct(self, x, key_mask, positions, memory=None, memory_mask=None):
        aux = self.zero
        for block in self.blocks:
            x, a = block(x, key_mask, positions, memory, memory_mask)
            aux = aux + a
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x, aux


class Transformer(NamedOutputs, nn.Cell):
    """Encoder-decoder Transformer. construct(src_ids, src_mask, tgt_ids, tgt_mask) -> (logits, aux_loss)."""

    output_names = ("logits", "aux_loss")

    def __init__(self, cfg, make_ffn=None):
        """``make_ffn(cfg, layer_index, is_decoder) -> (cell, returns_aux) | None`` lets MoE models swap FFNs."""
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, cfg.initializer_range)
        self.embed = Seq2SeqEmbedding(cfg, self.embed_tokens)

        def block(i, decoder):
            ffn, aux = (None, False)
            if make_ffn is not None:
                made = make_ffn(cfg, i, decoder)
                if made is not None:
                    ffn, aux = made
            return TransformerBlock(cfg, causal=decoder, cross=decoder, ffn=ffn, ffn_returns_aux=aux)

        final = cfg.pre_norm and cfg.final_norm
        self.encoder = Stack(cfg, [block(i, False) for i in range(cfg.num_layers)], final)
        self.decoder = Stack(cfg, [block(i, True) for i in range(cfg.decoder_layers)], final)
        self.tie = cfg.tie_word_embeddings
        self.lm_head = None if self.tie else Linear(cfg.hidden_size, cfg.vocab_size, "embed", "vocab",
                                                    has_bias=False, init_std=cfg.initializer_range,
                                                    compute_dtype=cfg.compute_dtype)
        self.logits_matmul = ops.MatMul(transpose_b=True)
        self.blas = blas_product(ms_dtype(cfg.compute_dtype))               # CPU float32: see layers/linear.py
        self.cast = ops.Cast()

    @staticmethod
    def positions_of(ids):
        b, s = ids.shape
        return ops.broadcast_to(ops.expand_dims(ops.arange(0, s, dtype=ms.int32), 0), (b, s))   # (B, S)

    def encode(self, src_ids, src_mask):
        x = self.embed(src_ids, self.positions_of(src_ids))                # (B, Ss, H)
        return self.encoder(x, src_mask, self.positions_of(src_ids))       # (B, Ss, H), aux

    def decode(self, memory, src_mask, tgt_ids, tgt_mask):
        x = self.embed(tgt_ids, self.positions_of(tgt_ids))                # (B, St, H)
        x, aux = self.decoder(x, tgt_mask, self.positions_of(tgt_ids), memory, src_mask)
        return self.project(x), aux                                        # (B, St, V)

    def project(self, x):
        b, s, h = x.shape
        if self.tie:
            w = self.cast(self.embed_tokens.weight, x.dtype)
            x2 = ops.reshape(x, (b * s, h))                                # (B*S, H)
            if self.blas is not None and x.dtype == ms.float32 and b * s >= BLAS_MIN_ROWS:
                logits = self.blas(x2, w)                                  # (B*S, V)
            else:
                logits = self.logits_matmul(x2, w)                         # (B*S, V)
            return ops.reshape(logits, (b, s, -1))                         # (B, S, V)
        return self.lm_head(x)                                             # (B, S, V)

    def construct(self, src_ids, src_mask, tgt_ids, tgt_mask):
        memory, enc_aux = self.encode(src_ids, src_mask)
        logits, dec_aux = self.decode(memory, src_mask, tgt_ids, tgt_mask)
        return logits, enc_aux + dec_aux

    def shard(self, sharder):
        sharder.shard(self.logits_matmul, "logits_matmul", ("batch", "embed"), ("vocab", "embed"))


def count_parameters(cfg) -> int:
    """Trainable parameters of ``Transformer(cfg)`` without building it (checked against built models in tests)."""
    h, f, v = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size
    hd, nh, nkv = cfg.dim_per_head, cfg.num_heads, cfg.kv_heads
    b = 1 if cfg.use_bias else 0
    norm = h * (2 if cfg.norm == "layernorm" and cfg.norm_bias else 1)
    attn = h * nh * hd + 2 * h * nkv * hd + nh * hd * h + b * (nh * hd + 2 * nkv * hd + h)
    ffn = (3 if cfg.is_gated else 2) * h * f + b * ((2 if cfg.is_gated else 1) * f + h)
    enc = cfg.num_layers * (attn + ffn + 2 * norm)
    dec = cfg.decoder_layers * (2 * attn + ffn + 3 * norm)
    final = 2 * norm if cfg.pre_norm and cfg.final_norm else 0
    emb = v * h + (cfg.max_position_embeddings * h if cfg.position_embedding == "learned" else 0)
    head = 0 if cfg.tie_word_embeddings else v * h
    return enc + dec + final + emb + head
