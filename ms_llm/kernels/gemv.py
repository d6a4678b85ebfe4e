"""``y (B, V) = x (B, H) @ W (V, H)^T`` for small B: the output head of small-batch decoding, as a fast GEMV.

Both cells take ``x (B, H)`` and ``w (V, H)`` (``w``'s rows are the output features: the layout of a tied token
embedding and of :class:`~ms_llm.layers.linear.Linear`'s weight) of one dtype, float32 or float16, and return
``y (B, V)`` in that dtype. Shape or dtype errors raise ValueError naming the shapes before anything is compiled.

* :class:`MatMulNT` is MindSpore's ``ops.MatMul(transpose_b=True)`` (the reference, and what training uses).
* :class:`Gemv` streams ``W`` exactly once per call: on CPU it calls ``GemvNT`` of ``csrc/gemv.cc`` through
  ``ops.Custom(func_type="aot")`` (compiled with g++ on first construction, ISA tier from
  :mod:`ms_llm.kernels._build`): each thread takes chunks of rows of ``W`` and computes all B dot products of every
  row while it is in L1, accumulating in float32 (float16 inputs are widened; the float16 output is rounded once).
  At B = 1 the product is memory bound (154 MB of float32 weights for GPT-2's vocabulary) and MindSpore's CPU
  MatMul reads ``W`` at about half the bandwidth the GEMV reaches (``bench/bench_gemv.py``). On Ascend it is
  ``ops.MatMul(transpose_b=True)`` (the cube unit handles the skinny product; no GEMV binary exists there), see
  ``ascend_kernels/gemv/README.md``. The kernel is correct for any B; it is fast for small B (each element of
  ``W`` is re-read from L1 ``ceil(B / 4)`` times), which is why generation only picks it for
  ``B <= GEMV_MAX_BATCH`` (8) (:func:`select_head_impl`).

Gradients: the op has a bprop made of MindSpore MatMuls (``dx = dy @ W``, ``dW = dy^T @ x``), so a graph that
differentiates through it gets the same gradients as through :class:`MatMulNT`; nothing in ms_llm trains with it
(generation uses it for the decode step and the prefill's last position only).
"""

from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops
from mindspore import dtype as mstype

from ._build import build_library
from ._device import kernel_device

__all__ = ["GEMV_IMPLS", "HEAD_IMPLS", "GEMV_MAX_BATCH", "MatMulNT", "Gemv", "make_gemv", "select_head_impl"]

GEMV_IMPLS = ("matmul", "gemv")
HEAD_IMPLS = ("auto",) + GEMV_IMPLS
# 'auto' uses the GEMV on CPU up to this batch. Measured (bench/results/gemv.json, 768 -> 50257, fp32, 2 threads,
# interleaved, quiet machine): median time of MindSpore's MatMul / the GEMV's = 1.96 (B = 1), 1.57 (B = 8),
# 0.95 (B = 16; 1.23 in an earlier run under load ~5). The kernel is correct for any B; from B = 16 on the product
# is compute bound and MatMul is as fast, so MatMul stays there.
GEMV_MAX_BATCH = 8


def _check_inputs(x_shape, w_shape, x_dtype, w_dtype):
    """ValueError naming the shapes/dtypes unless x (B, H), w (V, H), both float32 or both float16, non-empty."""
    shapes = f"x {x_shape}, w {w_shape}"
    if len(x_shape) != 2 or len(w_shape) != 2:
        raise ValueError(f"gemv expects x (B, H) and w (V, H) (y = x @ w^T); got {shapes}")
    if x_shape[1] != w_shape[1]:
        raise ValueError(f"gemv: x and w must agree on H (their last axis); got {shapes}")
    if x_shape[0] < 1 or x_shape[1] < 1 or w_shape[0] < 1:
        raise ValueError(f"gemv: empty operand; got {shapes}")
    if x_dtype not in (mstype.float32, mstype.float16) or w_dtype != x_dtype:
        raise ValueError(f"gemv: x and w must share dtype float32 or float16; got {x_dtype} and {w_dtype} for "
                         f"{shapes}")


class MatMulNT(nn.Cell):
    """``ops.MatMul(transpose_b=True)``: x (B, H), w (V, H) -> (B, V); the reference of :class:`Gemv`."""

    def __init__(self):
        super().__init__()
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x, w):
        _check_inputs(x.shape, w.shape, x.dtype, w.dtype)
        return self.matmul(x, w)                                            # (B, V)


class _CpuGemv(nn.Cell):
    """The aot C++ kernel ``GemvNT`` with a MatMul bprop."""

    def __init__(self):
        super().__init__()
        lib = build_library("gemv.cc")
        dx_matmul = ops.MatMul()                                           # dy (B, V) @ w (V, H)
        dw_matmul = ops.MatMul(transpose_a=True)                           # dy^T (V, B) @ x (B, H)

        def bprop(x, w, out, dout):
            return dx_matmul(dout, w), dw_matmul(dout, x)                  # (B, H), (V, H)

        self.gemv = ops.Custom(
            f"{lib}:GemvNT",
            out_shape=lambda x, w: (x[0], w[0]),                           # (B, V)
            out_dtype=lambda x, w: x,
            func_type="aot",
            bprop=bprop,
        )

    def construct(self, x, w):
        return self.gemv(x, w)                                             # (B, V)


class Gemv(nn.Cell):
    """``y = x @ w^T`` reading ``w`` once: the aot C++ GEMV on CPU, ``ops.MatMul(transpose_b=True)`` on Ascend;
    same contract as :class:`MatMulNT`. The device is read from ``ms.get_context('device_target')`` when the cell
    is constructed."""

    def __init__(self):
        super().__init__()
        self.device = kernel_device("Gemv", "make_gemv('matmul')")
        self.impl = _CpuGemv() if self.device == "CPU" else MatMulNT()

    def construct(self, x, w):
        _check_inputs(x.shape, w.shape, x.dtype, w.dtype)
        return self.impl(x, w)                                             # (B, V)


def make_gemv(impl: str) -> nn.Cell:
    """The ``x (B, H) @ w (V, H)^T`` cell named by ``impl`` ('matmul' or 'gemv')."""
    if impl == "matmul":
        return MatMulNT()
    if impl == "gemv":
        return Gemv()
    raise ValueError(f"unknown gemv impl {impl!r}; valid: {', '.join(GEMV_IMPLS)}")


def select_head_impl(head_impl: str, batch: int, device_target: str | None = None) -> str:
    """What the output head of a generation step runs: 'matmul' or 'gemv'.

    ``'auto'`` -> 'gemv' on CPU for ``batch <= GEMV_MAX_BATCH``, else 'matmul' (always 'matmul' on Ascend and any
    other device); 'matmul' and 'gemv' are returned as given ('gemv' on Ascend is MatMul inside :class:`Gemv`).
    """
    if head_impl not in HEAD_IMPLS:
        raise ValueError(f"head_impl must be one of {', '.join(repr(h) for h in HEAD_IMPLS)}, got {head_impl!r}")
    if head_impl != "auto":
        return head_impl
    device = ms.get_context("device_target") if device_target is None else device_target
    return "gemv" if device == "CPU" and batch <= GEMV_MAX_BATCH else "matmul"
