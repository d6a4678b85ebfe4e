"""Multi-head attention (self or cross; MHA, GQA) behind one interface.

The projections live here; the softmax(q k^T) v core is a kernel cell from :mod:`ms_llm.kernels.attention`
(``reference`` composite ops or ``fused`` flash attention), chosen by ``cfg.attention_impl`` (``auto``, the default:
fused on CPU, reference elsewhere; :func:`~ms_llm.kernels.attention.resolve_attention_impl`). Heads are laid out
as the core reads them: ``(B, nh, S, hd)`` for the reference core (its batched matmuls want heads outside),
``(B, S, nh, hd)`` for the fused one, which reads the projections in place (a reshape, no head transposes:
on CPU those were ~5% of a BERT-base training step). Masks are passed as a
key mask ``(B, Sk)`` plus the static causal / band flags of the layer. T5 / Switch self-attention adds a learned
relative position bias (:class:`RelativePositionBias`, shared by the layers of a stack) to the scores through the
kernels' additive-bias input (``has_bias=True``), so both ``reference`` and ``fused`` cores serve it.
"""
from __future__ import annotations

import math

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from ..kernels.attention import make_attention, resolve_attention_impl
from .common import normal_param
from .embedding import RotaryEmbedding
from .linear import Linear


def relative_position_bucket(relative: np.ndarray, bidirectional: bool, num_buckets: int, max_distance: int):
    """T5's bucket of each relative position (memory - query), as Mesh TensorFlow / Hugging Face compute it in
    float32: half the buckets exact small distances, half logarithmic up to ``max_distance``; with
    ``bidirectional`` half of them for positive distances."""
    relative = np.asarray(relative, np.int64)
    buckets = np.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0).astype(np.int64) * num_buckets
        n = np.abs(relative)
    else:
        n = -np.minimum(relative, 0)
    max_exact = num_buckets // 2
    # n < max_exact takes the exact branch below, so clamping n >= 1 inside the log (no log(0)) changes nothing
    large = max_exact + (np.log(np.maximum(n, 1).astype(np.float32) / np.float32(max_exact))
                         / np.float32(math.log(max_distance / max_exact))
                         * np.float32(num_buckets - max_exact)).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return buckets + np.where(n < max_exact, n, large)


class RelativePositionBias(nn.Cell):
    """T5 relative position bias (Raffel et al. 2020, section 2.1): a learned scalar per (bucket, head).

    ``construct(q_len, k_len)`` -> (1, nh, Sq, Sk) float32, queries aligned to the end of the keys. Distances
    beyond ``max_distance`` share the last bucket, so a bucket table over [-max_distance, max_distance] is exact.
    """

    def __init__(self, num_buckets: int, max_distance: int, num_heads: int, bidirectional: bool,
                 init_std: float = 0.02):
        super().__init__()
        self.max_distance = max_distance
        self.weight = normal_param((num_buckets, num_heads), init_std, "weight")   # HF relative_attention_bias
        table = relative_position_bucket(np.arange(-max_distance, max_distance + 1), bidirectional, num_buckets,
                                         max_distance)
        self.buckets = Tensor(table.astype(np.int32))                     # (2*D+1,)
        self.gather = ops.Gather()

    def construct(self, q_len: int, k_len: int):
        query = ops.expand_dims(ops.arange(q_len, dtype=ms.int32), 1) + (k_len - q_len)   # (Sq, 1)
        memory = ops.expand_dims(ops.arange(k_len, dtype=ms.int32), 0)                    # (1, Sk)
        relative = ops.clamp(memory - query, -self.max_distance, self.max_distance)       # (Sq, Sk)
        buckets = self.gather(self.buckets, relative + self.max_distance, 0)              # (Sq, Sk)
        bias = self.gather(self.weight, buckets, 0)                                       # (Sq, Sk, nh)
        return ops.expand_dims(ops.transpose(bias, (2, 0, 1)), 0)                         # (1, nh, Sq, Sk)


class Attention(nn.Cell):
    """Attention of queries from ``x`` over keys/values from ``kv_input`` (``x`` itself for self-attention).

    ``position_bias``: an optional cell ``(q_len, k_len) -> (1, nh, Sq, Sk)`` added to the scores (T5's
    :class:`RelativePositionBias`, possibly shared with other layers).
    """

    def __init__(self, cfg, causal: bool = False, band_width: int = 0, cross: bool = False,
                 scale: float | None = None, out_init_std: float | None = None,
                 position_bias: nn.Cell | None = None):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.kv_heads
        self.head_dim = cfg.dim_per_head
        self.groups = self.num_heads // self.num_kv_heads
        self.cross = cross
        self.causal = causal
        self.band_width = band_width
        h, nh, nkv, hd = cfg.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        kw = dict(has_bias=cfg.use_bias, init_std=cfg.initializer_range, compute_dtype=cfg.compute_dtype)
        self.q_proj = Linear(h, nh * hd, "embed", "heads", **kw)
        self.k_proj = Linear(h, nkv * hd, "embed", "heads", **kw)
        self.v_proj = Linear(h, nkv * hd, "embed", "heads", **kw)
        kw["init_std"] = cfg.initializer_range if out_init_std is None else out_init_std
        self.o_proj = Linear(nh * hd, h, "heads", "embed", **kw)
        self.use_rotary = cfg.position_embedding == "rotary" and not cross
        impl = resolve_attention_impl(cfg.attention_impl)
        # the heads' layout between the projections and the core: 'BNSD' (B, nh, S, hd) or 'BSND' (B, S, nh, hd)
        self.layout = "BSND" if impl == "fused" else "BNSD"
        self.head_axis = 2 if self.layout == "BSND" else 1
        self.rotary = (RotaryEmbedding(cfg.max_position_embeddings, hd, cfg.rope_theta, self.layout)
                       if self.use_rotary else None)
        self.scale = 1.0 / math.sqrt(hd) if scale is None else scale
        self.position_bias = position_bias
        # with a position bias the core takes it as a fifth input: softmax(q k^T * scale + bias), d bias included
        self.core = make_attention(impl, hd, causal=causal, band_width=band_width, scale=self.scale,
                                   has_bias=position_bias is not None, layout=self.layout)
        # KV-cache decoding (causal self-attention only): one query per sequence against a static cache whose
        # visible slots (filled, not padding, inside the band) the caller passes as the key mask, so this core is
        # neither causal nor banded.
        self.decode_core = (make_attention(impl, hd, causal=False, scale=self.scale)
                            if causal and not cross else None)
        self.cache_add = ops.IndexAdd(axis=2)          # decode: cache (B, nkv, L, hd)[:, :, slot] += k or v
        self.transpose = ops.Transpose()
        self.merge_transpose = ops.Transpose()

    def split_heads(self, x, heads):
        """(B, S, heads*hd) -> the core's layout: (B, S, heads, hd) for BSND, (B, heads, S, hd) for BNSD."""
        b, s = x.shape[0], x.shape[1]
        x = ops.reshape(x, (b, s, heads, self.head_dim))                 # (B, S, nh, hd)
        if self.layout == "BSND":
            return x
        return self.transpose(x, (0, 2, 1, 3))                            # (B, nh, S, hd)

    def to_cache_layout(self, x):
        """(B, nkv, S, hd), the KV cache's layout, from the core's layout."""
        if self.layout == "BSND":
            return self.transpose(x, (0, 2, 1, 3))                        # (B, nkv, S, hd)
        return x

    def repeat_kv(self, x):
        """GQA: nkv -> nh heads (on the head axis of the core's layout), kv head i serving query heads
        i*groups .. i*groups + groups - 1."""
        if self.groups == 1:
            return x
        shape = list(x.shape)
        reps = [1] * 5
        reps[self.head_axis + 1] = self.groups
        x = ops.expand_dims(x, self.head_axis + 1)                       # (B, nkv, 1, S, hd) / (B, S, nkv, 1, hd)
        x = ops.tile(x, tuple(reps))                                      # (B, nkv, g, S, hd) / (B, S, nkv, g, hd)
        shape[self.head_axis] = self.num_heads
        return ops.reshape(x, tuple(shape))                               # (B, nh, S, hd) / (B, S, nh, hd)

    def project_qkv(self, x, kv_input, q_positions, k_positions):
        q = self.split_heads(self.q_proj(x), self.num_heads)            # (B, nh, Sq, hd) / (B, Sq, nh, hd)
        k = self.split_heads(self.k_proj(kv_input), self.num_kv_heads)  # (B, nkv, Sk, hd) / (B, Sk, nkv, hd)
        v = self.split_heads(self.v_proj(kv_input), self.num_kv_heads)  # (B, nkv, Sk, hd) / (B, Sk, nkv, hd)
        if self.use_rotary:
            q = self.rotary(q, q_positions)
            k = self.rotary(k, k_positions)
        return q, k, v

    def merge_heads(self, out):
        """The core's output -> (B, S, nh*hd)."""
        if self.layout == "BNSD":
            out = self.merge_transpose(out, (0, 2, 1, 3))                 # (B, S, nh, hd)
        b, s = out.shape[0], out.shape[1]
        return ops.reshape(out, (b, s, self.num_heads * self.head_dim))  # (B, S, nh*hd)

    def construct(self, x, kv_input, key_mask, positions):
        """x (B, Sq, H), kv_input (B, Sk, H), key_mask (B, Sk) float 1/0, positions (B, Sq) for RoPE (self-attn)."""
        q, k, v = self.project_qkv(x, kv_input, positions, positions)
        if self.position_bias is not None:
            bias = self.position_bias(x.shape[1], kv_input.shape[1])         # (1, nh, Sq, Sk)
            out = self.core(q, self.repeat_kv(k), self.repeat_kv(v), key_mask, bias)   # like q
        else:
            out = self.core(q, self.repeat_kv(k), self.repeat_kv(v), key_mask)   # like q
        return self.o_proj(self.merge_heads(out))                            # (B, Sq, H)

    def construct_prefill(self, x, key_mask, positions):
        """Causal self-attention that also returns its keys/values ``(B, nkv, S, hd)`` (after RoPE) to seed a cache."""
        q, k, v = self.project_qkv(x, x, positions, positions)
        out = self.core(q, self.repeat_kv(k), self.repeat_kv(v), key_mask)   # like q
        return (self.o_proj(self.merge_heads(out)), self.to_cache_layout(k),
                self.to_cache_layout(v))                                     # (B, S, H), 2 x (B, nkv, S, hd)

    def construct_decode(self, x, positions, key_mask, slot, k_cache, v_cache):
        """One new token per sequence against a static KV cache held in place.

        x (B, 1, H); positions (B, 1) (RoPE); k_cache, v_cache (B, nkv, L, hd) non-trainable Parameters; slot (1,)
        int32: the cache slot every sequence's new keys/values go to (left padding keeps the slots of all rows
        aligned). They are *added* into that slot by one in-place ``IndexAdd`` per cache, so the slot must hold zeros
        (``ms_llm.generation`` zeroes or prefills the caches before each call and writes each slot once): MindSpore
        2.10's CPU ``ScatterNdUpdate`` copies the whole cache to its output (O(L) per step, 0.13 ms per cache at
        L = 320 and 1 ms at 2048, measured), ``IndexAdd`` touches only the slot. key_mask (B, L) float marks the
        slots it may attend to (its own included). Returns the output (B, 1, H); the caches change as a side effect.

        GQA needs no repeated cache: the ``groups`` query heads of one kv head become the query rows of that head,
        q (B, nkv, g, hd) against k (B, nkv, L, hd) (query head ``i*g + j`` uses kv head ``i``, as in repeat_kv).
        """
        q, k, v = self.project_qkv(x, x, positions, positions)             # one position: either layout reshapes
        b = q.shape[0]
        k = ops.reshape(k, (b, self.num_kv_heads, 1, self.head_dim))       # (B, nkv, 1, hd)
        v = ops.reshape(v, (b, self.num_kv_heads, 1, self.head_dim))       # (B, nkv, 1, hd)
        k_cache = ops.depend(k_cache, self.cache_add(k_cache, slot, ops.cast(k, k_cache.dtype)))
        v_cache = ops.depend(v_cache, self.cache_add(v_cache, slot, ops.cast(v, v_cache.dtype)))
        q = ops.reshape(q, (b, self.num_kv_heads, self.groups, self.head_dim))   # (B, nkv, g, hd)
        out = self.decode_core(ops.cast(q, k_cache.dtype), k_cache, v_cache, key_mask)   # (B, nkv, g, hd)
        out = ops.reshape(out, (b, 1, self.num_heads * self.head_dim))     # (B, 1, nh*hd)
        return self.o_proj(out)                                            # (B, 1, H)

    def shard(self, sharder):
        sharder.shard(self.transpose, "transpose", ("batch", "seq", "heads", "head_dim"))
        sharder.shard(self.merge_transpose, "merge_transpose", ("batch", "heads", "seq", "head_dim"))
