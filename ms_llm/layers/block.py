"""Residual blocks: pre-norm (GPT) or post-norm (Vaswani, BERT), optional cross-attention, dense or MoE FFN."""
from __future__ import annotations

import functools
import inspect

import mindspore as ms
from mindspore import nn, ops

from ..kernels.dropout import FusedDropout
from .attention import Attention
from .common import dropout
from .mlp import make_ffn
from .norm import make_norm


def _random_primitives(cell: nn.Cell) -> bool:
    """Whether ``cell`` itself (not its sub-cells) holds a primitive with random state (MindSpore marks those
    ``side_effect_hidden``: Dropout, StandardNormal, UniformReal, ...)."""
    return any(isinstance(v, ops.Primitive) and v.attrs.get("side_effect_hidden", False)
               for v in list(vars(cell).values()) + list(getattr(cell, "_primitives", {}).values()))


def repeats_draws_when_shared(cell: nn.Cell, float32: bool) -> bool:
    """Whether one graph shared by several copies of ``cell`` would give every copy the same random numbers.

    MindSpore's random primitives are seeded per primitive, and a shared graph takes the first copy's, so any of
    them repeats its draws. Our fused dropout does not: its kernel hashes (seed, call number) per call, and the call
    counter advances on every call, whichever layer makes it (a block already calls its one dropout cell two or
    three times per step). That holds where its kernel runs, on CPU for float32 inputs (``float32``: the block's
    compute dtype is float32); its fallback, MindSpore's Dropout, repeats."""
    if isinstance(cell, FusedDropout):
        return cell.kernel is None or not float32
    return _random_primitives(cell) or any(repeats_draws_when_shared(c, float32) for c in cell.cells())


def _reuse_graph_when_deterministic(init):
    """Decorator of ``TransformerBlock.__init__``: layers built from equal arguments share one parsed graph
    (``mindspore.lazy_inline(policy="front")``: the block's ``construct`` is parsed once and inlined at every layer),
    unless that would repeat random numbers from layer to layer.

    Why: a train step's compile time grows faster than its depth (GPT at hidden 128, dropout 0, forward + backward
    + AdamW: 9.0 s at 12 layers, 37.7 s at 48; with the shared block graph 5.9 s and 19.5 s; bench/README.md).
    ``policy="front"`` inlines before the backend, which is what runs on CPU (the default policy, whole-subgraph
    reuse, is Ascend-only in MindSpore 2.10: "Input[0] must be a Primitive ValueNode" on CPU).
    Why not with every random op: the shared graph resolves ``self``'s primitives from the first layer, so with
    MindSpore's Dropout every layer would use the first layer's seeds and draw *the same masks* (measured: two
    blocks, identical masks). Our fused dropout (CPU, float32) draws per call, so those blocks share the graph; blocks
    with MindSpore's Dropout (Ascend, float16 compute) or another random op in the FFN (noisy / sampled MoE routing,
    jitter) are unmarked after construction (:func:`unshare_graph`), so each is parsed on its own
    (:func:`repeats_draws_when_shared` decides).
    """
    lazy = ms.lazy_inline(init, policy="front")
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        float32 = signature.bind(self, *args, **kwargs).arguments["cfg"].compute_dtype == "float32"
        lazy(self, *args, **kwargs)                     # builds the block, then marks it for reuse
        if repeats_draws_when_shared(self, float32):    # decided on the block as built, whatever brought the op in
            unshare_graph(self)
    return wrapper


def shares_graph(cell: nn.Cell) -> bool:
    """Whether ``cell`` was built to share its parsed graph with the other cells of equal arguments."""
    return hasattr(cell, "_cell_init_args") and cell.cell_init_args.startswith("lazy_inline_")


def unshare_graph(cell: nn.Cell) -> None:
    """Parse ``cell`` on its own again (drops what ``lazy_inline`` set on it): for per-layer attributes that one
    shared graph cannot carry, such as pipeline stages (``ms_llm.parallel.pipeline.assign_stages``) or MindSpore's
    per-primitive random seeds (:func:`_reuse_graph_when_deterministic`)."""
    if shares_graph(cell):
        del cell._cell_init_args
        del cell.no_inline


class TransformerBlock(nn.Cell):
    """One layer. ``construct`` returns ``(hidden, aux_loss)``; aux_loss is the MoE auxiliary loss (0 if dense).

    ``ffn`` may be any cell mapping (B, S, H) -> (B, S, H); if ``ffn_returns_aux`` it returns (y, aux_loss).
    ``position_bias`` (a T5 relative position bias cell) is added to the self-attention scores; ``attn_scale``
    overrides 1/sqrt(head_dim) in self- and cross-attention (T5/Switch use 1.0).
    """

    @_reuse_graph_when_deterministic
    def __init__(self, cfg, causal: bool = False, band_width: int = 0, cross: bool = False,
                 ffn: nn.Cell | None = None, ffn_returns_aux: bool = False, out_init_std: float | None = None,
                 position_bias: nn.Cell | None = None, attn_scale: float | None = None):
        super().__init__()
        self.pre_norm = cfg.pre_norm
        self.has_cross = cross
        self.self_attn = Attention(cfg, causal=causal, band_width=band_width, out_init_std=out_init_std,
                                   scale=attn_scale, position_bias=position_bias)
        self.attn_norm = make_norm(cfg)
        self.cross_attn = (Attention(cfg, cross=True, out_init_std=out_init_std, scale=attn_scale) if cross
                           else None)
        self.cross_norm = make_norm(cfg) if cross else None
        self.ffn = ffn if ffn is not None else make_ffn(cfg)
        self.ffn_returns_aux = ffn_returns_aux
        self.ffn_norm = make_norm(cfg)
        self.drop = dropout(cfg.dropout)
        self.zero = ms.Tensor(0.0, ms.float32)

    def run_ffn(self, h):
        if self.ffn_returns_aux:
            return self.ffn(h)
        return self.ffn(h), self.zero

    def construct(self, x, key_mask, positions, memory=None, memory_mask=None):
        if self.pre_norm:
            h = self.attn_norm(x)
            x = x + self.drop(self.self_attn(h, h, key_mask, positions))
            if self.has_cross:
                h = self.cross_norm(x)
                x = x + self.drop(self.cross_attn(h, memory, memory_mask, positions))
            y, aux = self.run_ffn(self.ffn_norm(x))
            x = x + self.drop(y)
        else:
            x = self.attn_norm(x + self.drop(self.self_attn(x, x, key_mask, positions)))
            if self.has_cross:
                x = self.cross_norm(x + self.drop(self.cross_attn(x, memory, memory_mask, positions)))
            y, aux = self.run_ffn(x)
            x = self.ffn_norm(x + self.drop(y))
        return x, aux

    def construct_prefill(self, x, key_mask, positions):
        """Decoder self-attention block that also returns the layer's keys/values (B, nkv, S, hd) for a KV cache."""
        if self.has_cross:
            raise ValueError("TransformerBlock.construct_prefill: KV-cache decoding supports decoder-only blocks "
                             "(no cross-attention)")
        if self.pre_norm:
            a, k, v = self.self_attn.construct_prefill(self.attn_norm(x), key_mask, positions)
            x = x + self.drop(a)
            y, _ = self.run_ffn(self.ffn_norm(x))
            x = x + self.drop(y)
        else:
            a, k, v = self.self_attn.construct_prefill(x, key_mask, positions)
            x = self.attn_norm(x + self.drop(a))
            y, _ = self.run_ffn(x)
            x = self.ffn_norm(x + self.drop(y))
        return x, k, v

    def construct_decode(self, x, positions, key_mask, slot, k_cache, v_cache, layer=None):
        """One token per sequence (x (B, 1, H)) against this layer's KV cache Parameters, which are updated in place;
        see Attention.construct_decode. Returns the hidden state (B, 1, H).

        ``layer``: optional decode-layer cell of :mod:`ms_llm.kernels.decode_layer` (the fused kernel) that computes
        the whole pre-norm block from its weights; its new keys/values are then added into the caches here."""
        if self.has_cross:
            raise ValueError("TransformerBlock.construct_decode: KV-cache decoding supports decoder-only blocks "
                             "(no cross-attention)")
        if layer is not None:
            attn, ffn = self.self_attn, self.ffn
            y, k, v = layer(x, self.attn_norm.weight, self.attn_norm.bias, attn.q_proj.weight, attn.q_proj.bias,
                            attn.k_proj.weight, attn.k_proj.bias, attn.v_proj.weight, attn.v_proj.bias,
                            attn.o_proj.weight, attn.o_proj.bias, self.ffn_norm.weight, self.ffn_norm.bias,
                            ffn.fc_in.weight, ffn.fc_in.bias, ffn.fc_out.weight, ffn.fc_out.bias, k_cache, v_cache,
                            key_mask, slot)                                  # (B, 1, H), 2 x (B, nkv, 1, hd)
            y = ops.depend(y, attn.cache_add(k_cache, slot, k))
            return ops.depend(y, attn.cache_add(v_cache, slot, v))
        if self.pre_norm:
            a = self.self_attn.construct_decode(self.attn_norm(x), positions, key_mask, slot, k_cache, v_cache)
            x = x + self.drop(a)
            y, _ = self.run_ffn(self.ffn_norm(x))
            x = x + self.drop(y)
        else:
            a = self.self_attn.construct_decode(x, positions, key_mask, slot, k_cache, v_cache)
            x = self.attn_norm(x + self.drop(a))
            y, _ = self.run_ffn(x)
            x = self.ffn_norm(x + self.drop(y))
        return x
