"""Scaled dot-product attention core: a reference composite and a fused (flash-attention) kernel, same signature.

Both cells take ``q (B, nh, Sq, hd)``, ``k, v (B, nh, Sk, hd)`` (the caller repeats kv heads for GQA) and
``key_mask (B, Sk)`` float32 (1.0 = attend, 0.0 = padding) and return ``(B, nh, Sq, hd)`` in the input dtype.
A cell built with ``layout='BSND'`` (the names of MindSpore's ``flash_attention_score``) takes and returns
``(B, S, nh, hd)`` instead, the layout of a ``(B, S, nh * hd)`` projection reshaped: the fused core reads it in
place, so a caller saves the head transposes (two copies of q, k, v and of the output, forward and backward);
the reference core transposes.
Key ``j`` is visible to query ``i`` iff ``key_mask[b, j] == 1`` and, when ``causal``, ``j <= i + (Sk - Sq)`` and,
when ``band_width > 0`` (causal only), ``j > i + (Sk - Sq) - band_width`` (GPT-3's locally banded attention: a
query sees itself and the previous ``band_width - 1`` keys). Queries are aligned to the end of the keys, so
``Sq = 1`` against a KV cache of ``Sk`` keys sees all of them. Scores are ``q k^T * scale`` (``scale`` defaults to
``1 / sqrt(hd)``); the softmax runs in float32 for float32 and float16 inputs. A query row with no visible key
outputs zeros (and gets zero gradients), never NaN.

Additive score bias (T5 / Switch relative position bias, ALiBi-like tables): a cell built with ``has_bias=True``
is called ``construct(q, k, v, key_mask, bias)`` with ``bias (1 or B, nh, Sq, Sk)`` float32 (float32 also for
float16 inputs) and computes ``softmax(q k^T * scale + bias)`` over the same visible keys (the bias never changes
visibility; it must be finite where a key is visible). Its gradient is the softmax gradient of the scores
(``dS``), zero where a key is not visible and summed over the batch when the bias is shared (leading dim 1).
Without ``has_bias`` (the default) the cell takes the four arguments above, exactly as before; passing a bias to
such a cell, or none to a ``has_bias`` cell, raises a ValueError, as does a bias of the wrong shape or dtype
(naming the shapes, before compilation).

* :class:`ReferenceAttention` is made of MindSpore ops (BatchMatMul, softmax, masks from ``arange`` comparisons);
  it compiles in GRAPH_MODE and is differentiated by MindSpore autodiff. The matmuls run in the input dtype.
* :class:`FusedAttention` runs the flash-attention algorithm (key tiles, online softmax, no ``Sq x Sk`` matrix,
  backward recomputing the tiles from the saved logsumexp; Dao et al. 2022). On CPU it calls the C++ kernels in
  ``csrc/flash_attention.cc`` through ``ops.Custom(func_type="aot")`` with an aot backward wired as the bprop; the
  library is compiled with g++ on first construction (see :mod:`ms_llm.kernels._build`). On Ascend it calls
  MindSpore's ``ops.flash_attention_score`` instead (see :func:`_ascend_fa_args`). The device is read from
  ``ms.get_context('device_target')`` when the cell is constructed.
"""

from __future__ import annotations

import math

import numpy as np

import mindspore as ms
from mindspore import Tensor, nn, ops
from mindspore import dtype as mstype

from ._build import build_library
from ._device import resolve_auto

__all__ = ["ReferenceAttention", "FusedAttention", "make_attention", "resolve_attention_impl", "ATTENTION_IMPLS",
           "ATTENTION_LAYOUTS"]

ATTENTION_IMPLS = ("reference", "fused")
ATTENTION_LAYOUTS = ("BNSD", "BSND")     # q/k/v/out as (B, nh, S, hd) or (B, S, nh, hd)
_INT32_MAX = 2147483647
_MASK_FILL = -3.0e38  # finite, so a fully masked row gives a finite (then zeroed) softmax instead of NaN


def _check_config(head_dim, causal, band_width, scale):
    if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim <= 0:
        raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {causal!r}")
    if not isinstance(band_width, int) or isinstance(band_width, bool) or band_width < 0:
        raise ValueError(f"band_width must be an int >= 0, got {band_width!r}")
    if band_width > 0 and not causal:
        raise ValueError(f"band_width={band_width} needs causal=True (locally banded attention is causal)")
    if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool)
                              or not math.isfinite(scale) or scale <= 0):
        raise ValueError(f"scale must be a positive finite float or None, got {scale!r}")
    return float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)


def _check_layout(layout):
    if layout not in ATTENTION_LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(ATTENTION_LAYOUTS)}, got {layout!r}")
    return layout


def _as_bnsd(shape, layout):
    """``shape`` of a q/k/v/out tensor in ``layout`` as the (B, nh, S, hd) shape it stands for."""
    if layout == "BSND" and len(shape) == 4:
        return (shape[0], shape[2], shape[1], shape[3])
    return tuple(shape)


def _check_inputs(q_shape, k_shape, v_shape, m_shape, head_dim, given=""):
    """Raises ValueError naming the shapes unless q (B, nh, Sq, hd), k = v (B, nh, Sk, hd), key_mask (B, Sk);
    ``given`` (appended) names the shapes as passed when they were read in another layout."""
    shapes = f"q {q_shape}, k {k_shape}, v {v_shape}, key_mask {m_shape}, head_dim {head_dim}{given}"
    if len(q_shape) != 4 or len(k_shape) != 4 or len(v_shape) != 4 or len(m_shape) != 2:
        raise ValueError(f"attention expects q (B, nh, Sq, hd), k and v (B, nh, Sk, hd), key_mask (B, Sk); "
                         f"got {shapes}")
    if q_shape[3] != head_dim or k_shape[3] != head_dim or v_shape[3] != head_dim:
        raise ValueError(f"attention: last dim of q, k, v must equal head_dim; got {shapes}")
    if k_shape[0] != q_shape[0] or k_shape[1] != q_shape[1] or v_shape[0] != q_shape[0] \
            or v_shape[1] != q_shape[1] or v_shape[2] != k_shape[2]:
        raise ValueError(f"attention: q, k, v must agree on B and nh (repeat kv heads first) and k, v on Sk; "
                         f"got {shapes}")
    if m_shape[0] != q_shape[0] or m_shape[1] != k_shape[2]:
        raise ValueError(f"attention: key_mask must be (B, Sk) = ({q_shape[0]}, {k_shape[2]}); got {shapes}")
    if q_shape[2] <= 0 or k_shape[2] <= 0:
        raise ValueError(f"attention: empty sequence; got {shapes}")


def _check_bias(has_bias, bias_given, q_shape, k_shape, b_shape, b_dtype):
    """Raises ValueError unless a bias is given exactly when ``has_bias`` and is (1 or B, nh, Sq, Sk) float32."""
    if not has_bias:
        if bias_given:
            raise ValueError("attention: this cell was built without has_bias=True and takes no bias; build it with "
                             "has_bias=True to pass one")
        return
    if not bias_given:
        raise ValueError("attention: this cell was built with has_bias=True: call it with (q, k, v, key_mask, bias)")
    if len(q_shape) != 4 or len(k_shape) != 4:
        return                                      # _check_inputs names the bad q / k shapes
    b, nh, sq, sk = q_shape[0], q_shape[1], q_shape[2], k_shape[2]
    if len(b_shape) != 4 or b_shape[0] not in (1, b) or b_shape[1] != nh or b_shape[2] != sq or b_shape[3] != sk:
        raise ValueError(f"attention: bias must be (1 or B, nh, Sq, Sk) = (1 or {b}, {nh}, {sq}, {sk}); got bias "
                         f"{b_shape} for q {q_shape}, k {k_shape}")
    if b_dtype != mstype.float32:
        raise ValueError(f"attention: bias must be float32 (also for float16 q, k, v); got {b_dtype} for bias "
                         f"{b_shape}")


def _check_dtypes(q_dtype, k_dtype, v_dtype):
    if q_dtype not in (mstype.float32, mstype.float16) or k_dtype != q_dtype or v_dtype != q_dtype:
        raise ValueError(f"attention: q, k, v must share dtype float32 or float16; got {q_dtype}, {k_dtype}, "
                         f"{v_dtype}")


def _visible_mask(key_mask, sq, sk, causal, band_width):
    """(B, 1, Sq, Sk) bool: key_mask[b, j] == 1 and the causal / band structure (queries aligned to the end)."""
    visible = ops.expand_dims(ops.expand_dims(key_mask > 0.5, 1), 1)        # (B, 1, 1, Sk)
    if causal:
        rows = ops.expand_dims(ops.arange(0, sq, 1, dtype=mstype.int32), 1)  # (Sq, 1)
        cols = ops.expand_dims(ops.arange(0, sk, 1, dtype=mstype.int32), 0)  # (1, Sk)
        offset = sk - sq
        structure = cols <= rows + offset                                    # (Sq, Sk)
        if band_width > 0:
            structure = ops.logical_and(structure, cols > rows + (offset - band_width))
        visible = ops.logical_and(visible, structure)                        # (B, 1, Sq, Sk)
    else:
        visible = ops.broadcast_to(visible, (-1, 1, sq, -1))                 # (B, 1, Sq, Sk)
    return visible


def _check_call(head_dim, has_bias, layout, q, k, v, key_mask, bias):
    """Every check of a core's call (shapes, dtypes, the bias against ``has_bias``), before compilation. Shapes
    are checked, and named in the messages, as the (B, nh, S, hd) shapes they stand for in ``layout``."""
    q_shape = _as_bnsd(q.shape, layout)
    k_shape = _as_bnsd(k.shape, layout)
    v_shape = _as_bnsd(v.shape, layout)
    given = ""
    if layout == "BSND":
        given = f" (layout BSND: q {q.shape}, k {k.shape}, v {v.shape} read as (B, S, nh, hd))"
    _check_inputs(q_shape, k_shape, v_shape, key_mask.shape, head_dim, given)
    _check_dtypes(q.dtype, k.dtype, v.dtype)
    if bias is None:
        _check_bias(has_bias, False, q_shape, k_shape, (), None)
    else:
        _check_bias(has_bias, True, q_shape, k_shape, bias.shape, bias.dtype)


def _check_has_bias(has_bias):
    if not isinstance(has_bias, bool):
        raise ValueError(f"has_bias must be a bool, got {has_bias!r}")
    return has_bias


class ReferenceAttention(nn.Cell):
    """softmax(q k^T * scale [+ bias] + mask) v from MindSpore ops; see the module docstring for the contract."""

    def __init__(self, head_dim: int, causal: bool = False, band_width: int = 0, scale: float | None = None,
                 has_bias: bool = False, layout: str = "BNSD"):
        super().__init__()
        self.scale = _check_config(head_dim, causal, band_width, scale)
        self.has_bias = _check_has_bias(has_bias)
        self.layout = _check_layout(layout)
        self.head_dim = head_dim
        self.causal = causal
        self.band_width = band_width
        self.qk = ops.BatchMatMul(transpose_b=True)
        self.pv = ops.BatchMatMul()

    def construct(self, q, k, v, key_mask, bias=None):
        _check_call(self.head_dim, self.has_bias, self.layout, q, k, v, key_mask, bias)
        if self.layout == "BSND":
            out = self.bnsd(ops.transpose(q, (0, 2, 1, 3)), ops.transpose(k, (0, 2, 1, 3)),
                            ops.transpose(v, (0, 2, 1, 3)), key_mask, bias)            # (B, nh, Sq, hd)
            return ops.transpose(out, (0, 2, 1, 3))                                    # (B, Sq, nh, hd)
        return self.bnsd(q, k, v, key_mask, bias)

    def bnsd(self, q, k, v, key_mask, bias):
        sq = q.shape[2]
        sk = k.shape[2]
        scores = ops.cast(self.qk(q, k), mstype.float32) * self.scale       # (B, nh, Sq, Sk)
        if self.has_bias:
            scores = scores + bias                                           # (B, nh, Sq, Sk)
        visible = _visible_mask(key_mask, sq, sk, self.causal, self.band_width)  # (B, 1, Sq, Sk)
        scores = ops.where(visible, scores, _MASK_FILL)                      # (B, nh, Sq, Sk)
        probs = ops.softmax(scores, -1) * ops.cast(visible, mstype.float32)  # (B, nh, Sq, Sk); empty rows -> 0
        return self.pv(ops.cast(probs, q.dtype), v)                          # (B, nh, Sq, hd)

    def shard(self, sharder):
        sharder.shard(self.qk, "qk", ("batch", "heads", "seq", "head_dim"), ("batch", "heads", "kv", "head_dim"))
        sharder.shard(self.pv, "pv", ("batch", "heads", "seq", "kv"), ("batch", "heads", "kv", "head_dim"))


class _CpuFlashAttention(nn.Cell):
    """The aot C++ flash-attention kernels (forward + backward) on CPU. With ``has_bias`` the biased entry points
    (``FlashAttentionBias{Fwd,Bwd}``: bias as a sixth input, its gradient as a fourth output) are used instead; they
    are distinct symbols because MindSpore identifies a Custom op with a bprop by its function name, so a 5-input and
    a 6-input op on one symbol would collide in a graph holding both (Switch: biased self-, unbiased cross-attention).
    """

    def __init__(self, scale: float, causal: bool, band_width: int, has_bias: bool = False, layout: str = "BNSD"):
        super().__init__()
        self.has_bias = has_bias
        lib = build_library("flash_attention.cc")
        bsnd = layout == "BSND"
        self.params = Tensor(np.array([scale, 1.0 if causal else 0.0, band_width, 1.0 if bsnd else 0.0], np.float32))
        # lse is (B, nh, Sq) in both layouts
        lse_shape = (lambda q: [q[0], q[2], q[1]]) if bsnd else (lambda q: q[:3])
        if has_bias:
            self.fwd = self._biased_op(lib, lse_shape)
            return
        bwd = ops.Custom(
            f"{lib}:FlashAttentionBwd",
            out_shape=lambda q, k, v, m, p, o, do, lse: (q, k, v),
            out_dtype=lambda q, k, v, m, p, o, do, lse: (q, k, v),
            func_type="aot",
        )

        def bprop(q, k, v, key_mask, params, out, dout):
            dq, dk, dv = bwd(q, k, v, key_mask, params, out[0], dout[0], out[1])
            return dq, dk, dv, ops.zeros_like(key_mask), ops.zeros_like(params)

        self.fwd = ops.Custom(
            f"{lib}:FlashAttentionFwd",
            out_shape=lambda q, k, v, m, p: (q, lse_shape(q)),   # out like q, lse (B, nh, Sq)
            out_dtype=lambda q, k, v, m, p: (q, mstype.float32),
            func_type="aot",
            bprop=bprop,
        )

    @staticmethod
    def _biased_op(lib, lse_shape):
        bwd = ops.Custom(
            f"{lib}:FlashAttentionBiasBwd",
            out_shape=lambda q, k, v, m, p, b, o, do, lse: (q, k, v, b),
            out_dtype=lambda q, k, v, m, p, b, o, do, lse: (q, k, v, mstype.float32),
            func_type="aot",
        )

        def bprop(q, k, v, key_mask, params, bias, out, dout):
            dq, dk, dv, dbias = bwd(q, k, v, key_mask, params, bias, out[0], dout[0], out[1])
            return dq, dk, dv, ops.zeros_like(key_mask), ops.zeros_like(params), dbias

        return ops.Custom(
            f"{lib}:FlashAttentionBiasFwd",
            out_shape=lambda q, k, v, m, p, b: (q, lse_shape(q)),   # out like q, lse (B, nh, Sq)
            out_dtype=lambda q, k, v, m, p, b: (q, mstype.float32),
            func_type="aot",
            bprop=bprop,
        )

    def construct(self, q, k, v, key_mask, bias=None):
        if self.has_bias:
            out, _ = self.fwd(q, k, v, ops.cast(key_mask, mstype.float32), self.params, bias)
        else:
            out, _ = self.fwd(q, k, v, ops.cast(key_mask, mstype.float32), self.params)
        return out


def _ascend_fa_args(causal: bool, band_width: int, sq: int, sk: int):
    """``(sparse_mode, pre_tokens, next_tokens)`` for ``ops.flash_attention_score`` with an explicit mask.

    The key padding mask cannot be expressed by the compressed 2048x2048 masks of sparse_mode 2/3/4, so the
    fused Ascend path passes the full ``(B, 1, Sq, Sk)`` uint8 mask (1 = masked out) with sparse_mode 0. In that
    mode ``pre_tokens``/``next_tokens`` count from the top-left vertex: the kernel computes only ``i - pre_tokens
    <= j <= i + next_tokens`` and skips tiles outside it. We set that band to exactly our causal/band structure
    (queries aligned to the end of the keys: offset ``Sk - Sq``) where the op's documented limits allow it, and
    to everything (2^31 - 1 both ways) otherwise; the explicit mask is exact in all cases.
    """
    if not causal:
        return 0, _INT32_MAX, _INT32_MAX
    offset = sk - sq
    next_tokens = offset                                        # j - i <= Sk - Sq
    pre_tokens = _INT32_MAX if band_width == 0 else band_width - 1 - offset  # i - j <= band_width - 1 - offset
    valid = True
    if pre_tokens < 0 and next_tokens < 0:
        valid = False
    elif pre_tokens < 0 and (next_tokens < -pre_tokens or -pre_tokens >= sq):
        valid = False
    elif next_tokens < 0 and (-next_tokens > pre_tokens or -next_tokens >= sk):
        valid = False
    if not valid:
        return 0, _INT32_MAX, _INT32_MAX
    return 0, pre_tokens, next_tokens


def _ascend_bias_args(q, scale: float, bias):
    """``(query, real_shift, scalar_value)`` for ``ops.flash_attention_score`` computing ``q k^T * scale + bias``.

    The op's ``real_shift`` (pse) is documented two ways: MindSpore's docstring says ``scale * (q k^T) + pse``,
    CANN's FlashAttentionScore (= ``pse_type`` 1 of ``speed_fusion_attention``) says ``scale * (pse + q k^T)``.
    Folding the scale into ``q`` and passing ``scalar_value = 1`` makes both readings the same computation, so the
    mapping is right whichever holds. With no bias, ``(q, None, scale)``. ``real_shift`` must have the query's
    dtype (float16); ``(1, nh, Sq, Sk)`` and ``(B, nh, Sq, Sk)`` are both accepted shapes.
    """
    if bias is None:
        return ops.cast(q, mstype.float16), None, scale
    q = ops.cast(ops.cast(q, mstype.float32) * scale, mstype.float16)               # (B, nh, Sq, hd)
    return q, ops.cast(bias, mstype.float16), 1.0                                   # (1|B, nh, Sq, Sk)


class _AscendFlashAttention(nn.Cell):
    """MindSpore's FlashAttentionScore (Ascend only): float16 compute, explicit (B, 1, Sq, Sk) mask; the additive
    bias goes to its ``real_shift`` input (see :func:`_ascend_bias_args`)."""

    def __init__(self, head_dim: int, scale: float, causal: bool, band_width: int, has_bias: bool = False,
                 layout: str = "BNSD"):
        super().__init__()
        if head_dim % 16 != 0 or head_dim > 512:
            raise ValueError(f"ops.flash_attention_score needs head_dim a multiple of 16 and <= 512, got {head_dim}")
        self.scale = scale
        self.causal = causal
        self.band_width = band_width
        self.has_bias = has_bias
        self.layout = layout
        self.s_axis = 1 if layout == "BSND" else 2

    def construct(self, q, k, v, key_mask, bias=None):
        nh = q.shape[3 - self.s_axis]
        sq = q.shape[self.s_axis]
        sk = k.shape[self.s_axis]
        sparse_mode, pre_tokens, next_tokens = _ascend_fa_args(self.causal, self.band_width, sq, sk)
        visible = _visible_mask(key_mask, sq, sk, self.causal, self.band_width)     # (B, 1, Sq, Sk)
        attn_mask = ops.cast(ops.logical_not(visible), mstype.uint8)                # (B, 1, Sq, Sk) 1 = masked
        query, real_shift, scalar_value = _ascend_bias_args(q, self.scale, bias if self.has_bias else None)
        out = ops.flash_attention_score(
            query, ops.cast(k, mstype.float16), ops.cast(v, mstype.float16), nh, real_shift=real_shift,
            attn_mask=attn_mask, scalar_value=scalar_value, pre_tokens=pre_tokens, next_tokens=next_tokens,
            input_layout=self.layout, sparse_mode=sparse_mode)                      # like q
        row_any = ops.cast(ops.any(visible, -1, keep_dims=True), mstype.float16)  # (B, 1, Sq, 1)
        if self.layout == "BSND":
            row_any = ops.transpose(row_any, (0, 2, 1, 3))                         # (B, Sq, 1, 1)
        return ops.cast(out * row_any, q.dtype)                                    # like q


class FusedAttention(nn.Cell):
    """Flash attention: aot C++ kernels on CPU, ``ops.flash_attention_score`` on Ascend; same contract as
    :class:`ReferenceAttention`."""

    def __init__(self, head_dim: int, causal: bool = False, band_width: int = 0, scale: float | None = None,
                 has_bias: bool = False, layout: str = "BNSD"):
        super().__init__()
        self.scale = _check_config(head_dim, causal, band_width, scale)
        self.has_bias = _check_has_bias(has_bias)
        self.layout = _check_layout(layout)
        self.head_dim = head_dim
        self.causal = causal
        self.band_width = band_width
        self.device = ms.get_context("device_target")
        if self.device == "Ascend":
            self.impl = _AscendFlashAttention(head_dim, self.scale, causal, band_width, has_bias, layout)
        elif self.device == "CPU":
            self.impl = _CpuFlashAttention(self.scale, causal, band_width, has_bias, layout)
        else:
            raise ValueError(f"FusedAttention supports device_target 'CPU' or 'Ascend', got {self.device!r}; "
                             f"use make_attention('reference', ...) there")

    def construct(self, q, k, v, key_mask, bias=None):
        _check_call(self.head_dim, self.has_bias, self.layout, q, k, v, key_mask, bias)
        if bias is None:
            return self.impl(q, k, v, key_mask)
        return self.impl(q, k, v, key_mask, bias)


def resolve_attention_impl(impl: str) -> str:
    """``model.attention_impl`` as a core: 'auto' is 'fused' on CPU (the flash kernel: the reference's results
    within float32 rounding, faster at the benchmarked shapes, no (S, S) scores in memory, and the heads' layout
    without transposes) and 'reference' elsewhere (Ascend's FlashAttentionScore computes in float16 and needs
    head_dim a multiple of 16: ask for it with 'fused'); 'reference' and 'fused' are returned as they are."""
    return resolve_auto(impl)


def make_attention(impl: str, head_dim: int, causal: bool = False, band_width: int = 0,
                   scale: float | None = None, has_bias: bool = False, layout: str = "BNSD") -> nn.Cell:
    """The attention core named by ``impl`` ('reference' or 'fused'); ``has_bias`` adds the bias input;
    ``layout`` ('BNSD' or 'BSND') is the q/k/v/out layout."""
    kw = dict(causal=causal, band_width=band_width, scale=scale, has_bias=has_bias, layout=layout)
    if impl == "reference":
        return ReferenceAttention(head_dim, **kw)
    if impl == "fused":
        return FusedAttention(head_dim, **kw)
    raise ValueError(f"unknown attention impl {impl!r}; valid: {', '.join(ATTENTION_IMPLS)}")
