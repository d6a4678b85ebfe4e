"""One pre-norm GPT decoder layer for one new token per sequence against its KV cache: the decode step of
generation as one kernel per layer (CPU), with a composite reference of the same signature.

Both cells are built with ``(num_heads, eps, scale, activation)`` and called

``construct(x, ln1_w, ln1_b, wq, bq, wk, bk, wv, bv, wo, bo, ln2_w, ln2_b, w1, b1, w2, b2, k_cache, v_cache,
key_mask, slot) -> (y, k_new, v_new)``

with ``x (B, 1, H)``; the LayerNorm weights and biases ``(H,)``; ``wq (nh*hd, H)``, ``wk, wv (nkv*hd, H)``,
``wo (H, nh*hd)``, ``w1 (F, H)``, ``w2 (H, F)`` in :class:`~ms_llm.layers.linear.Linear`'s ``(out, in)`` layout with
their biases ``(out,)`` (any bias may be ``None``: no bias); ``k_cache, v_cache (B, nkv, L, hd)``; ``key_mask (B, L)``
float (1 = the new token sees that slot, its own slot included); ``slot (1,)`` int32. It computes what
:meth:`ms_llm.layers.block.TransformerBlock.construct_decode` computes for a pre-norm block with a plain FFN::

    h = LN1(x); q, k, v = h Wq^T + bq, h Wk^T + bk, h Wv^T + bv
    a = softmax(q k^T * scale) v   over the visible slots, slot ``slot`` holding this step's k and v
    x1 = x + a Wo^T + bo;  y = x1 + act(LN2(x1) W1^T + b1) W2^T + b2

and returns ``y (B, 1, H)`` and this step's ``k_new, v_new (B, nkv, 1, hd)``; the caches are only read (slot
``slot`` of them never), the caller adds ``k_new, v_new`` into them. GQA: query head ``i`` uses kv head
``i // (nh / nkv)``. A sequence with no visible slot gets a zero attention output, as in
:mod:`ms_llm.kernels.attention`. ``activation``: 'relu', 'gelu' (erf) or 'gelu_new' (tanh form, GPT-2). Everything
is float32. Shape and dtype errors raise ValueError naming the tensors, before anything is compiled.

* :class:`DecodeLayerReference`: MindSpore ops (the model's own LayerNorm, MatMul and attention-core primitives).
* :class:`FusedDecodeLayer`: on CPU the C++ kernel ``DecodeLayer`` of ``csrc/decode_layer.cc`` through
  ``ops.Custom(func_type="aot")`` (built with g++ on first construction): one call per layer instead of ~30
  MindSpore kernels, projections streamed with the GEMV tile of the output head, a thread team through the phases.
  On Ascend it is the reference (no binary exists there). Inference only: no bprop.

:func:`select_layer_impl` is what ``generate(layer_impl='auto')`` uses: the fused kernel on CPU for float32
pre-norm LayerNorm models with a plain FFN and no rotary embedding (GPT-2 / GPT-3) up to ``FUSED_MAX_BATCH``
sequences, the model's own blocks otherwise (:func:`fused_unsupported` names the reason).
"""

from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops
from mindspore import dtype as mstype

from ..layers.mlp import Activation
from ._build import build_library
from ._device import kernel_device
from .attention import _MASK_FILL

__all__ = ["LAYER_IMPLS", "FUSED_MAX_BATCH", "DecodeLayerReference", "FusedDecodeLayer", "make_decode_layer",
           "fused_unsupported", "select_layer_impl"]

LAYER_IMPLS = ("composite", "fused")
ACTIVATIONS = {"relu": 0, "gelu": 1, "gelu_new": 2}
# 'auto' picks the fused layer on CPU up to this batch (bench/README.md, "Fused decode layer").
FUSED_MAX_BATCH = 8

_WEIGHTS = ("ln1_w", "ln1_b", "wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo", "ln2_w", "ln2_b", "w1", "b1", "w2",
            "b2")


_NAMES = ("x",) + _WEIGHTS + ("k_cache", "v_cache", "key_mask", "slot")


def _check_inputs(shapes: tuple, dtypes: tuple, num_heads: int):
    """ValueError naming the tensor unless the shapes/dtypes (in the order of ``_NAMES``; ``None`` for an absent
    bias) follow the module docstring's contract."""
    x, kc = shapes[0], shapes[17]
    if len(x) != 3 or x[1] != 1:
        raise ValueError(f"decode layer: x must be (B, 1, H); got {x}")
    if len(kc) != 4:
        raise ValueError(f"decode layer: k_cache must be (B, nkv, L, hd); got {kc}")
    b, h = x[0], x[2]
    nkv, length, hd = kc[1], kc[2], kc[3]
    if num_heads % nkv:
        raise ValueError(f"decode layer: num_heads {num_heads} is not a multiple of the caches' kv heads {nkv}")
    f = shapes[13][0] if len(shapes[13]) == 2 else -1
    nq, nk = num_heads * hd, nkv * hd
    want = ((h,), (h,), (nq, h), (nq,), (nk, h), (nk,), (nk, h), (nk,), (h, nq), (h,), (h,), (h,), (f, h), (f,),
            (h, f), (h,), (b, nkv, length, hd), (b, nkv, length, hd), (b, length), (1,))
    for i in range(len(want)):
        got = shapes[i + 1]
        if got is not None and tuple(got) != want[i]:
            raise ValueError(f"decode layer: {_NAMES[i + 1]} must be {want[i]} for x {tuple(x)}, k_cache "
                             f"{tuple(kc)}, {num_heads} heads; got {tuple(got)}")
    for i in range(len(dtypes)):
        expected = mstype.int32 if i == len(dtypes) - 1 else mstype.float32
        if dtypes[i] is not None and dtypes[i] != expected:
            raise ValueError(f"decode layer: {_NAMES[i]} must be {expected}, got {dtypes[i]}")


def _check_call(num_heads, *tensors):
    """_check_inputs on the tensors themselves (x, the 16 weights, k_cache, v_cache, key_mask, slot)."""
    shapes = []
    dtypes = []
    for t in tensors:
        if t is None:
            shapes.append(None)
            dtypes.append(None)
        else:
            shapes.append(t.shape)
            dtypes.append(t.dtype)
    _check_inputs(tuple(shapes), tuple(dtypes), num_heads)


def _check_config(num_heads: int, eps: float, scale: float, activation: str):
    if activation not in ACTIVATIONS:
        raise ValueError(f"decode layer: activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    if num_heads < 1 or not eps > 0 or not scale > 0:
        raise ValueError(f"decode layer: need num_heads >= 1, eps > 0, scale > 0; got {num_heads}, {eps}, {scale}")


class _DecodeLayerBase(nn.Cell):
    """Configuration, checks and the zero biases standing in for absent ones (shared by both implementations)."""

    def __init__(self, num_heads: int, eps: float, scale: float, activation: str):
        super().__init__()
        _check_config(num_heads, eps, scale, activation)
        self.num_heads = num_heads
        self.eps = float(eps)
        self.scale = float(scale)
        self.activation = activation

    def fill_biases(self, weights):
        """``weights`` with each ``None`` bias replaced by zeros of its row count (read from the matching matrix)."""
        out = list(weights)
        for i in range(1, len(out), 2):       # the odd entries are the biases; their matrices / gains come first
            if out[i] is None:
                rows = out[i - 1].shape[0]
                out[i] = ops.zeros((rows,), mstype.float32)
        return tuple(out)


class DecodeLayerReference(_DecodeLayerBase):
    """The layer from MindSpore ops (LayerNorm, MatMul, BatchMatMul, softmax over the visible slots, as the
    reference attention core computes it); see the module docstring."""

    def __init__(self, num_heads: int, eps: float, scale: float, activation: str):
        super().__init__(num_heads, eps, scale, activation)
        self.norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=self.eps)
        self.matmul = ops.MatMul(transpose_b=True)
        self.qk = ops.BatchMatMul(transpose_b=True)
        self.pv = ops.BatchMatMul()
        self.act = Activation(activation, fused=False)                         # the model's FFN activation, ops

    def dense(self, x2, w, b):
        return self.matmul(x2, w) + b                                          # (B, out)

    def construct(self, x, ln1_w, ln1_b, wq, bq, wk, bk, wv, bv, wo, bo, ln2_w, ln2_b, w1, b1, w2, b2, k_cache,
                  v_cache, key_mask, slot):
        weights = (ln1_w, ln1_b, wq, bq, wk, bk, wv, bv, wo, bo, ln2_w, ln2_b, w1, b1, w2, b2)
        _check_call(self.num_heads, x, *weights, k_cache, v_cache, key_mask, slot)
        ln1_w, ln1_b, wq, bq, wk, bk, wv, bv, wo, bo, ln2_w, ln2_b, w1, b1, w2, b2 = self.fill_biases(weights)
        b, _, h = x.shape
        _, nkv, length, hd = k_cache.shape
        g = self.num_heads // nkv
        x2 = ops.reshape(x, (b, h))                                            # (B, H)
        hn, _, _ = self.norm(x2, ln1_w, ln1_b)                                 # (B, H)
        q = ops.reshape(self.dense(hn, wq, bq), (b, nkv, g, hd))               # (B, nkv, g, hd)
        k_new = ops.reshape(self.dense(hn, wk, bk), (b, nkv, 1, hd))           # (B, nkv, 1, hd)
        v_new = ops.reshape(self.dense(hn, wv, bv), (b, nkv, 1, hd))           # (B, nkv, 1, hd)
        at_slot = ops.reshape(ops.cast(ops.arange(length, dtype=mstype.int32) == slot, mstype.float32),
                              (1, 1, length, 1))                               # (1, 1, L, 1)
        keys = k_cache * (1.0 - at_slot) + k_new * at_slot                     # (B, nkv, L, hd)
        values = v_cache * (1.0 - at_slot) + v_new * at_slot                   # (B, nkv, L, hd)
        visible = ops.reshape(key_mask > 0.5, (b, 1, 1, length))              # (B, 1, 1, L)
        scores = self.qk(q, keys) * self.scale                                 # (B, nkv, g, L)
        scores = ops.where(visible, scores, _MASK_FILL)                        # (B, nkv, g, L)
        probs = ops.softmax(scores, -1) * ops.cast(visible, mstype.float32)    # (B, nkv, g, L); no slot -> 0
        a = ops.reshape(self.pv(probs, values), (b, self.num_heads * hd))      # (B, nh*hd)
        x1 = x2 + self.dense(a, wo, bo)                                        # (B, H)
        hn2, _, _ = self.norm(x1, ln2_w, ln2_b)                                # (B, H)
        y = x1 + self.dense(self.act(self.dense(hn2, w1, b1)), w2, b2)         # (B, H)
        return ops.reshape(y, (b, 1, h)), k_new, v_new                         # (B, 1, H), 2 x (B, nkv, 1, hd)


class _CpuDecodeLayer(nn.Cell):
    """The aot C++ kernel ``DecodeLayer`` (inference only)."""

    def __init__(self):
        super().__init__()
        lib = build_library("decode_layer.cc")
        self.op = ops.Custom(
            f"{lib}:DecodeLayer",
            out_shape=lambda x, *rest: (x, (rest[16][0], rest[16][1], 1, rest[16][3]),
                                        (rest[16][0], rest[16][1], 1, rest[16][3])),
            out_dtype=lambda x, *rest: (x, x, x),
            func_type="aot",
        )

    def construct(self, *inputs):
        return self.op(*inputs)                                                # (B, 1, H), 2 x (B, nkv, 1, hd)


class FusedDecodeLayer(_DecodeLayerBase):
    """The layer as one C++ kernel call on CPU (the reference on Ascend); see the module docstring."""

    def __init__(self, num_heads: int, eps: float, scale: float, activation: str):
        super().__init__(num_heads, eps, scale, activation)
        self.device = kernel_device("FusedDecodeLayer", "make_decode_layer('composite', ...)")
        if self.device == "CPU":
            self.impl = _CpuDecodeLayer()
            self.params = Tensor(np.array([self.eps, self.scale, ACTIVATIONS[activation]], np.float32))
        else:
            self.impl = DecodeLayerReference(num_heads, eps, scale, activation)

    def construct(self, x, ln1_w, ln1_b, wq, bq, wk, bk, wv, bv, wo, bo, ln2_w, ln2_b, w1, b1, w2, b2, k_cache,
                  v_cache, key_mask, slot):
        weights = (ln1_w, ln1_b, wq, bq, wk, bk, wv, bv, wo, bo, ln2_w, ln2_b, w1, b1, w2, b2)
        _check_call(self.num_heads, x, *weights, k_cache, v_cache, key_mask, slot)
        if self.device != "CPU":
            return self.impl(x, *weights, k_cache, v_cache, key_mask, slot)
        return self.impl(x, *self.fill_biases(weights), k_cache, v_cache, key_mask, slot, self.params)


def make_decode_layer(impl: str, num_heads: int, eps: float, scale: float, activation: str) -> nn.Cell:
    """The decode-layer cell named by ``impl``: 'fused' (:class:`FusedDecodeLayer`) or 'composite'
    (:class:`DecodeLayerReference`, the same ops the model's blocks use)."""
    if impl == "fused":
        return FusedDecodeLayer(num_heads, eps, scale, activation)
    if impl == "composite":
        return DecodeLayerReference(num_heads, eps, scale, activation)
    raise ValueError(f"unknown decode layer impl {impl!r}; valid: {', '.join(LAYER_IMPLS)}")


def fused_unsupported(cfg) -> str | None:
    """Why the fused layer cannot run the decoder layers of a model config (``None``: it can)."""
    if cfg.moe.num_experts > 0:
        return "model.moe.num_experts > 0 (MoE feed-forward layers)"
    checks = ((cfg.pre_norm, "model.pre_norm is false (post-norm blocks)"),
              (cfg.norm == "layernorm", f"model.norm is {cfg.norm!r} (needs 'layernorm')"),
              (cfg.position_embedding != "rotary", "model.position_embedding is 'rotary'"),
              (cfg.activation in ACTIVATIONS, f"model.activation is {cfg.activation!r} (needs one of "
                                              f"{', '.join(ACTIVATIONS)})"),
              (cfg.compute_dtype == "float32", f"model.compute_dtype is {cfg.compute_dtype!r} (needs float32)"))
    for ok, reason in checks:
        if not ok:
            return reason
    return None


def select_layer_impl(layer_impl: str, cfg, batch: int, device_target: str | None = None) -> str:
    """What the decoder layers of a generation step run: 'composite' (the model's blocks) or 'fused'.

    ``'auto'`` -> 'fused' on CPU when :func:`fused_unsupported` finds nothing and ``batch <= FUSED_MAX_BATCH``, else
    'composite'; an explicit 'fused' the model cannot use raises ValueError naming the reason.
    """
    if layer_impl not in ("auto",) + LAYER_IMPLS:
        raise ValueError(f"layer_impl must be one of 'auto', {', '.join(repr(i) for i in LAYER_IMPLS)}, got "
                         f"{layer_impl!r}")
    reason = fused_unsupported(cfg)
    if layer_impl == "fused" and reason is not None:
        raise ValueError(f"layer_impl='fused' cannot run this model: {reason}")
    if layer_impl != "auto":
        return layer_impl
    device = ms.get_context("device_target") if device_target is None else device_target
    return "fused" if device == "CPU" and reason is None and batch <= FUSED_MAX_BATCH else "composite"
