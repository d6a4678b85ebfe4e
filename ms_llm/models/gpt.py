"""Decoder-only language models: GPT-2/GPT-3 (Radford et al. 2019; Brown et al. 2020) and Llama-style decoders.

GPT-3 (section 2.1 of Brown et al. 2020): pre-norm residual blocks, learned positions, GELU, input and output
embeddings tied, "alternating dense and locally banded sparse attention patterns in the layers of the transformer,
similar to the Sparse Transformer" -> ``attention_pattern: alternating_banded`` makes every odd layer (1, 3, ...)
banded: query ``i`` sees keys ``i - band_width + 1 .. i``. On CPU the band is a mask inside the attention core; on
Ascend the fused core maps it to FlashAttentionScore's ``pre_tokens``/``next_tokens`` band (kernels/attention.py).

The options modern checkpoints need come from :class:`~ms_llm.config.ModelConfig`: ``norm: rmsnorm``,
``position_embedding: rotary``, ``activation: swiglu``, ``num_kv_heads`` (GQA), ``tie_word_embeddings: false``,
``use_bias: false``.

``GPTLMHeadModel.construct(input_ids, attention_mask=None, position_ids=None)`` returns ``logits`` (B, S, V) (plus
``aux_loss`` when the model has MoE layers, as GLaM does). Without ``position_ids`` positions are ``0..S-1``
(Hugging Face's default); ``attention_mask`` is the (B, S) padding mask (1 = token, 0 = padding).
``generate`` (Hugging Face conventions, static KV cache) lives in :mod:`ms_llm.generation`.
"""
from __future__ import annotations

import math

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from ..layers.block import TransformerBlock
from ..layers.common import dropout
from ..layers.embedding import Embedding, SinusoidalPositions
from ..layers.linear import BLAS_MIN_ROWS, Linear, blas_product
from ..layers.mlp import FeedForward
from ..layers.norm import make_norm
from .outputs import NamedOutputs
from ..checkpoint.io import np_dtype

GPT_POSITIONS = ("learned", "sinusoidal", "rotary", "none")


def layer_band_width(cfg, i: int) -> int:
    """Band width of layer ``i``'s attention: 0 = dense; GPT-3's alternating pattern bands the odd layers."""
    if cfg.attention_pattern == "alternating_banded" and i % 2 == 1:
        return cfg.band_width
    return 0


def check_gpt_config(cfg) -> None:
    """Raise ValueError naming the key for settings a decoder-only model cannot honour."""
    if cfg.position_embedding not in GPT_POSITIONS:
        raise ValueError(f"model.position_embedding: '{cfg.position_embedding}' is not supported by the decoder-only "
                         f"model; use one of {GPT_POSITIONS}")
    if cfg.type_vocab_size:
        raise ValueError(f"model.type_vocab_size: decoder-only models have no segment embeddings "
                         f"(got {cfg.type_vocab_size}); set it to 0")


def gpt_param_count(cfg) -> int:
    """Trainable parameters of ``GPTLMHeadModel(cfg)`` (dense FFNs), counted from shapes without building it.

    Verified against instantiated models in tests/models/test_gpt.py; used for the GPT-3 family table.
    """
    h, f, nl, v = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_layers, cfg.vocab_size
    nh, nkv, hd = cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
    bias = 1 if cfg.use_bias else 0
    norm = h * (2 if (cfg.norm == "layernorm" and cfg.norm_bias) else 1)
    attn = h * nh * hd + 2 * h * nkv * hd + nh * hd * h + bias * (nh * hd + 2 * nkv * hd + h)
    n_mats = 3 if cfg.is_gated else 2
    ffn = n_mats * h * f + bias * ((n_mats - 1) * f + h)
    layer = attn + ffn + 2 * norm
    total = v * h + nl * layer
    if cfg.position_embedding == "learned":
        total += cfg.max_position_embeddings * h
    if cfg.pre_norm and cfg.final_norm:
        total += norm
    if not cfg.tie_word_embeddings:
        total += v * h
    return total


class GPTModel(nn.Cell):
    """Token (+ position) embeddings, a stack of causal blocks and the final norm.

    ``construct(input_ids, attention_mask=None, position_ids=None) -> (hidden (B, S, H), aux_loss)``.
    Subclasses change the blocks by overriding :meth:`make_block` (GLaM puts MoE blocks in every other layer), or
    pass ``make_ffn(cfg, i) -> (cell, returns_aux) | None`` to swap only the feed-forward of layer ``i``.
    """

    def __init__(self, cfg, make_ffn=None):
        super().__init__()
        check_gpt_config(cfg)
        self.cfg = cfg
        self._make_ffn = make_ffn
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, cfg.initializer_range, "vocab")
        if cfg.position_embedding == "learned":
            self.embed_positions = Embedding(cfg.max_position_embeddings, cfg.hidden_size, cfg.initializer_range,
                                             "seq")
        elif cfg.position_embedding == "sinusoidal":
            self.embed_positions = SinusoidalPositions(cfg.max_position_embeddings, cfg.hidden_size)
        else:
            self.embed_positions = None    # rotary positions are applied inside attention; 'none' has none
        self.embed_scale = math.sqrt(cfg.hidden_size) if cfg.scale_embeddings else 1.0
        self.drop = dropout(cfg.dropout)
        self.blocks = nn.CellList([self.make_block(cfg, i) for i in range(cfg.num_layers)])
        # each layer's band (0 = dense), read from the blocks so that overridden make_block stays consistent
        self.band_widths = tuple(int(b.self_attn.band_width) for b in self.blocks)
        self.num_layers = cfg.num_layers
        self.final_norm = make_norm(cfg) if (cfg.pre_norm and cfg.final_norm) else None
        self.zero = ms.Tensor(0.0, ms.float32)

    def make_block(self, cfg, i: int) -> nn.Cell:
        """Layer ``i``: a causal pre/post-norm block, banded where the attention pattern says so.

        Residual output projections get GPT-2's scaled init std / sqrt(2 * num_layers).
        """
        out_std = cfg.initializer_range / math.sqrt(2.0 * cfg.num_layers)
        ffn, returns_aux = None, False
        if self._make_ffn is not None:
            made = self._make_ffn(cfg, i)
            if made is not None:
                ffn, returns_aux = made
        if ffn is None:
            # GPT-2's MLP (and Megatron's) drops out the FFN output (the block does), not the intermediate
            # activation: no inner dropout (HF GPT2MLP: c_fc -> act -> c_proj -> dropout).
            ffn = FeedForward(cfg.hidden_size, cfg.ffn_hidden_size, cfg.activation, has_bias=cfg.use_bias,
                              dropout_rate=0.0, init_std=cfg.initializer_range, out_init_std=out_std,
                              compute_dtype=cfg.compute_dtype)
        return TransformerBlock(cfg, causal=True, band_width=layer_band_width(cfg, i), ffn=ffn,
                                ffn_returns_aux=returns_aux, out_init_std=out_std)

    @staticmethod
    def default_positions(input_ids):
        b, s = input_ids.shape
        return ops.broadcast_to(ops.expand_dims(ops.arange(0, s, dtype=ms.int32), 0), (b, s))   # (B, S)

    def embed(self, input_ids, position_ids):
        x = self.embed_tokens(input_ids)                                    # (B, S, H)
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        if self.embed_positions is not None:
            x = x + self.embed_positions(position_ids)                      # (B, S, H)
        return self.drop(x)

    def prepare(self, input_ids, attention_mask, position_ids):
        """Float (B, S) key mask and int32 (B, S) positions, defaults filled in."""
        if attention_mask is None:
            key_mask = ops.ones(input_ids.shape, ms.float32)                # (B, S)
        else:
            key_mask = ops.cast(attention_mask, ms.float32)                 # (B, S)
        if position_ids is None:
            positions = self.default_positions(input_ids)                   # (B, S)
        else:
            positions = ops.cast(position_ids, ms.int32)                    # (B, S)
        return key_mask, positions

    def construct(self, input_ids, attention_mask=None, position_ids=None):
        key_mask, positions = self.prepare(input_ids, attention_mask, position_ids)
        x = self.embed(input_ids, positions)                                # (B, S, H)
        aux = self.zero
        for block in self.blocks:
            x, a = block(x, key_mask, positions)
            aux = aux + a
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x, aux

    def construct_prefill(self, input_ids, attention_mask, position_ids):
        """Full forward over the prompt that also returns every layer's keys/values (tuples of (B, nkv, S, hd))."""
        key_mask, positions = self.prepare(input_ids, attention_mask, position_ids)
        x = self.embed(input_ids, positions)                                # (B, S, H)
        ks = ()
        vs = ()
        for block in self.blocks:
            x, k, v = block.construct_prefill(x, key_mask, positions)
            ks = ks + (k,)
            vs = vs + (v,)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x, ks, vs

    def construct_decode(self, input_ids, position_ids, dense_mask, band_mask, slot, k_caches, v_caches, layer=None):
        """One token per sequence against the KV caches (tuples of (B, nkv, L, hd) Parameters, one per layer), which
        are written in place; returns the hidden state (B, 1, H).

        dense_mask / band_mask (B, L): slots visible to the new token in dense / banded layers; slot (1,) int32: the
        cache slot the new tokens' keys/values are added into (it must hold zeros; see Attention.construct_decode);
        layer: optional fused decode-layer cell run for every block (TransformerBlock.construct_decode).
        """
        positions = ops.cast(position_ids, ms.int32)                        # (B, 1)
        x = self.embed(input_ids, positions)                                # (B, 1, H)
        for i in range(self.num_layers):
            mask = band_mask if self.band_widths[i] > 0 else dense_mask
            x = self.blocks[i].construct_decode(x, positions, mask, slot, k_caches[i], v_caches[i], layer)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x


class GPTLMHeadModel(NamedOutputs, nn.Cell):
    """Causal language model: :class:`GPTModel` + output projection (tied to the token embedding by default).

    ``construct(input_ids, attention_mask=None, position_ids=None) -> logits (B, S, V)``; models with MoE layers
    (``cfg.moe.num_experts > 0``) return ``(logits, aux_loss)``.
    """

    output_names = ("logits",)
    backbone_cls = GPTModel

    def __init__(self, cfg, make_ffn=None):
        super().__init__()
        self.cfg = cfg
        self.decoder = self.backbone_cls(cfg, make_ffn)
        self.has_aux = cfg.moe.num_experts > 0
        if self.has_aux:
            self.output_names = ("logits", "aux_loss")
        self.tie = cfg.tie_word_embeddings
        self.lm_head = None if self.tie else Linear(cfg.hidden_size, cfg.vocab_size, "embed", "vocab",
                                                    has_bias=False, init_std=cfg.initializer_range,
                                                    compute_dtype=cfg.compute_dtype)
        self.logits_matmul = ops.MatMul(transpose_b=True)
        self.compute_dtype = ms.float16 if cfg.compute_dtype == "float16" else ms.float32
        self.blas = blas_product(self.compute_dtype)                       # CPU float32: see layers/linear.py
        self.cast = ops.Cast()

    def init_weights(self, seed: int | None = None) -> None:
        """Re-draw every trainable weight deterministically (GPT-2 scheme): matrices N(0, initializer_range), the
        residual output projections (attention ``o_proj``, FFN ``fc_out``) N(0, initializer_range / sqrt(2 L)),
        biases 0, norm gains 1. Frozen tables (rotary, sinusoidal) are left alone. ``seed=None`` draws the seed
        from numpy's global generator, so ``np.random.seed`` (which the trainer sets) makes it reproducible."""
        seed = int(np.random.randint(0, 2**31 - 1)) if seed is None else int(seed)
        rng = np.random.default_rng(seed)
        std = self.cfg.initializer_range
        out_std = std / math.sqrt(2.0 * self.cfg.num_layers)
        for name, p in self.parameters_and_names():
            if not p.requires_grad:
                continue
            shape = tuple(p.shape)
            parts = name.split(".")
            if len(parts) > 1 and parts[-2].endswith("norm"):
                value = np.ones(shape) if parts[-1] == "weight" else np.zeros(shape)
            elif len(shape) == 1:
                value = np.zeros(shape)
            elif name.endswith(("o_proj.weight", "fc_out.weight")):
                value = rng.normal(0.0, out_std, size=shape)
            else:
                value = rng.normal(0.0, std, size=shape)
            p.set_data(Tensor(value.astype(np_dtype(p.dtype))))

    def project(self, x, head=None):
        """Hidden states (B, S, H) -> float32 logits (B, S, V).

        ``head`` (generation only; None in training and ``construct``) is a cell computing ``x2d (N, H) @ w (V, H)^T``
        -- :class:`~ms_llm.kernels.gemv.Gemv` for ``generate(head_impl='gemv')`` -- used instead of the model's own
        MatMul on the tied embedding, or on the ``lm_head`` weight (``Linear`` stores it ``(out, in) = (V, H)``, the
        layout the GEMV reads) with ``lm_head``'s compute/output dtypes and bias, so both heads give the same logits
        up to float32 summation order.
        """
        b, s, h = x.shape
        if self.tie:
            w = self.cast(self.decoder.embed_tokens.weight, self.compute_dtype)
            x2 = self.cast(ops.reshape(x, (b * s, h)), self.compute_dtype)           # (B*S, H)
            if head is None and self.blas is not None and b * s >= BLAS_MIN_ROWS:
                logits = self.blas(x2, w)                                             # (B*S, V)
            elif head is None:
                logits = self.logits_matmul(x2, w)                                    # (B*S, V)
            else:
                logits = head(x2, w)                                                  # (B*S, V)
            return self.cast(ops.reshape(logits, (b, s, -1)), ms.float32)  # (B, S, V)
        if head is None:
            return self.cast(self.lm_head(x), ms.float32)                   # (B, S, V)
        return self.cast(self.lm_head.linear(x, head), ms.float32)         # (B, S, V)

    def construct(self, input_ids, attention_mask=None, position_ids=None):
        x, aux = self.decoder(input_ids, attention_mask, position_ids)     # (B, S, H)
        logits = self.project(x)                                            # (B, S, V)
        if self.has_aux:
            return logits, aux
        return logits

    def construct_prefill(self, input_ids, attention_mask, position_ids, head=None):
        """Prompt forward for generation: last-position logits (B, V) and every layer's keys/values. ``head``: see
        :meth:`project`."""
        x, ks, vs = self.decoder.construct_prefill(input_ids, attention_mask, position_ids)
        logits = self.project(x[:, -1:], head)                              # (B, 1, V)
        return ops.reshape(logits, (logits.shape[0], logits.shape[2])), ks, vs   # (B, V)

    def construct_decode(self, input_ids, position_ids, dense_mask, band_mask, slot, k_caches, v_caches,
                         head=None, layer=None):
        """One decoding step: logits (B, V) of the new tokens; the cache Parameters are updated in place. ``head``:
        see :meth:`project`; ``layer``: see :meth:`GPTModel.construct_decode`."""
        x = self.decoder.construct_decode(input_ids, position_ids, dense_mask, band_mask, slot, k_caches,
                                          v_caches, layer)                   # (B, 1, H)
        logits = self.project(x, head)                                      # (B, 1, V)
        # a reshape, not logits[:, 0]: CPU StridedSlice over (B, 1, V) cost ~22 ms per step at B=8, V=50257
        return ops.reshape(logits, (logits.shape[0], logits.shape[2]))      # (B, V)

    def generate(self, input_ids, max_new_tokens: int = 20, **kwargs):
        """Hugging Face style ``generate``; see :func:`ms_llm.generation.generate` for the arguments."""
        from ..generation import generate
        return generate(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)

    def shard(self, sharder):
        sharder.shard(self.logits_matmul, "logits_matmul", ("batch", "embed"), ("vocab", "embed"))
