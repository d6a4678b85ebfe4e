"""Switch Transformer (Fedus et al. 2021): a T5-style encoder-decoder, a top-1 sparse feed-forward every other layer.

T5 v1.1 body (Raffel et al. 2020): shared token embedding (not scaled, no absolute positions), pre-norm blocks with
a scale-only RMS layer norm, no biases, unscaled dot-product attention plus a learned relative position bias computed
by the first layer of each stack and shared by the others (bidirectional buckets in the encoder, causal ones in the
decoder; cross-attention has none), a final norm per stack, and the output projection tied to the embedding with the
decoder output scaled by d_model^-0.5 (Mesh TensorFlow). Layers ``i`` with ``moe.is_moe_layer(i)`` (odd layers by
default, Hugging Face's ``sparse_step = 2``) replace the dense FFN by :class:`~ms_llm.moe.MoELayer` (``router: topk``,
``top_k: 1``: Switch routing, float32 router, jitter, capacity factors, load-balancing and z losses).

Same interface as :class:`~ms_llm.models.transformer.Transformer`:
``construct(src_ids, src_mask, tgt_ids, tgt_mask) -> (logits (B, St, V), aux_loss)`` plus ``encode`` / ``decode``
for :mod:`ms_llm.models.seq2seq_decode`. ``aux_loss`` is the sum over MoE layers of the weighted router losses.
"""
from __future__ import annotations

import math

from mindspore import ops

from ..layers.attention import RelativePositionBias
from ..layers.block import TransformerBlock
from ..layers.embedding import Embedding
from ..layers.common import ms_dtype
from ..layers.linear import Linear, blas_product
from ..moe.layer import MoELayer, check_causal_routing
from .transformer import Seq2SeqEmbedding, Stack, Transformer


def check_switch_config(cfg) -> None:
    """Raise ValueError naming the key for settings the Switch model does not implement."""
    if cfg.moe.num_experts < 1:
        raise ValueError("model.moe.num_experts: a Switch Transformer needs experts (>= 1)")
    if cfg.position_embedding != "relative":
        raise ValueError(f"model.position_embedding: Switch uses T5 relative position bias ('relative'), "
                         f"got '{cfg.position_embedding}'")
    if not cfg.pre_norm:
        raise ValueError("model.pre_norm: Switch (T5) blocks are pre-norm; set it to true")
    if any(cfg.moe.is_moe_layer(i) for i in range(cfg.decoder_layers)):
        check_causal_routing(cfg, "Switch decoder")


class SwitchTransformer(Transformer):
    """Switch Transformer encoder-decoder (see the module docstring); ``cls(cfg: ModelConfig)``."""

    output_names = ("logits", "aux_loss")

    def __init__(self, cfg):
        check_switch_config(cfg)
        # The blocks differ from Transformer's (shared relative bias, unscaled attention), so build every part
        # here rather than through Transformer.__init__; encode/decode/construct are inherited unchanged.
        super(Transformer, self).__init__()
        self.cfg = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, cfg.initializer_range)
        self.embed = Seq2SeqEmbedding(cfg, self.embed_tokens)
        self.encoder = Stack(cfg, self.make_blocks(cfg, decoder=False), final_norm=True)
        self.decoder = Stack(cfg, self.make_blocks(cfg, decoder=True), final_norm=True)
        self.tie = cfg.tie_word_embeddings
        self.lm_head = None if self.tie else Linear(cfg.hidden_size, cfg.vocab_size, "embed", "vocab",
                                                    has_bias=False, init_std=cfg.initializer_range,
                                                    compute_dtype=cfg.compute_dtype)
        self.output_scale = 1.0 / math.sqrt(cfg.hidden_size) if self.tie else 1.0
        self.logits_matmul = ops.MatMul(transpose_b=True)
        self.blas = blas_product(ms_dtype(cfg.compute_dtype))               # CPU float32: see layers/linear.py
        self.cast = ops.Cast()

    @staticmethod
    def make_blocks(cfg, decoder: bool):
        n = cfg.decoder_layers if decoder else cfg.num_layers
        bias = RelativePositionBias(cfg.relative_num_buckets, cfg.relative_max_distance, cfg.num_heads,
                                    bidirectional=not decoder, init_std=cfg.initializer_range)
        blocks = []
        for i in range(n):
            sparse = cfg.moe.is_moe_layer(i)
            blocks.append(TransformerBlock(cfg, causal=decoder, cross=decoder,
                                           ffn=MoELayer(cfg) if sparse else None, ffn_returns_aux=sparse,
                                           position_bias=bias, attn_scale=1.0))
        return blocks

    def project(self, x):
        if self.tie:
            x = x * self.output_scale                                      # (B, S, H) Mesh TF rescaling
        return super().project(x)                                          # (B, S, V)
