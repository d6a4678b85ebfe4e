"""The product of a linear layer, ``y = x w^T (+ b)`` with ``x (N, K)``, ``w (M, K)``, ``b (M,)``, through OpenBLAS
on CPU, and MindSpore's ``ops.MatMul`` + ``ops.Add`` as its same-signature reference.

Both cells are called ``construct(x, w)`` or ``construct(x, w, b)`` (float32, 2-D ``x`` and ``w``); gradients flow to
every input: ``dx = dy w``, ``dw = dy^T x``, ``db = sum_rows(dy)``. Shape and dtype errors raise ValueError naming
the shapes, before anything is compiled.

* :class:`ReferenceLinearProduct`: ``ops.MatMul(transpose_b=True)`` then ``ops.Add``, and MindSpore's backward.
* :class:`BlasLinearProduct`: on CPU the C++ kernels of ``csrc/blas_linear.cc`` through
  ``ops.Custom(func_type="aot")``: the forward calls SGEMM of OpenBLAS (the ``scipy-openblas32`` wheel) into an
  output pre-filled with the bias, the backward (wired as the bprop) two SGEMMs and a column sum. MindSpore 2.10's
  CPU MatMul runs the backward's layouts at 69-109 GFLOPS at BERT-base shapes where OpenBLAS runs every layout at
  ~190-220 (``bench/bench_train_kernels.py``). On Ascend it is the reference (the cube unit's MatMul).

:class:`ms_llm.layers.linear.Linear` uses the BLAS cell on CPU for float32 products of more than ``SWAP_ROWS[1]``
rows (training and prefill); decode-sized products keep MindSpore's MatMul (see ``layers/linear.py``).
"""

from __future__ import annotations

from mindspore import nn, ops
from mindspore import dtype as mstype

from ._build import build_library
from ._device import kernel_device

__all__ = ["LINEAR_PRODUCT_IMPLS", "ReferenceLinearProduct", "BlasLinearProduct", "make_linear_product"]

LINEAR_PRODUCT_IMPLS = ("reference", "blas")


def _check_inputs(x, w, b):
    shapes = f"x {x.shape}, w {w.shape}" + (f", b {b.shape}" if b is not None else "")
    if len(x.shape) != 2 or len(w.shape) != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"linear product: x must be (N, K) and w (M, K); got {shapes}")
    if b is not None and b.shape != (w.shape[0],):
        raise ValueError(f"linear product: b must be (M,) with M = w.shape[0]; got {shapes}")
    dtypes = (x.dtype, w.dtype) + ((b.dtype,) if b is not None else ())
    if any(d != mstype.float32 for d in dtypes):
        raise ValueError(f"linear product: inputs must be float32; got {', '.join(str(d) for d in dtypes)} for "
                         f"{shapes}")


class ReferenceLinearProduct(nn.Cell):
    """``ops.MatMul(transpose_b=True)`` and ``ops.Add``; see the module docstring."""

    def __init__(self):
        super().__init__()
        self.matmul = ops.MatMul(transpose_b=True)
        self.add = ops.Add()

    def construct(self, x, w, b=None):
        _check_inputs(x, w, b)
        y = self.matmul(x, w)                                              # (N, M)
        if b is not None:
            y = self.add(y, b)
        return y


class _CpuBlasLinear(nn.Cell):
    """The aot C++ forwards (with and without bias), each with its aot C++ backward as the bprop."""

    def __init__(self):
        super().__init__()
        lib = build_library("blas_linear.cc")
        bwd = ops.Custom(f"{lib}:LinearBwd", out_shape=lambda x, w, dy: (x, w, (w[0],)),
                         out_dtype=lambda x, w, dy: (x, x, x), func_type="aot")
        bwd_nobias = ops.Custom(f"{lib}:LinearBwdNoBias", out_shape=lambda x, w, dy: (x, w),
                                out_dtype=lambda x, w, dy: (x, x), func_type="aot")

        def bprop(x, w, b, out, dout):
            return bwd(x, w, dout)                                         # dx (N, K), dw (M, K), db (M,)

        def bprop_nobias(x, w, out, dout):
            return bwd_nobias(x, w, dout)                                  # dx (N, K), dw (M, K)

        self.fwd = ops.Custom(f"{lib}:LinearFwd", out_shape=lambda x, w, b: (x[0], w[0]),
                              out_dtype=lambda x, w, b: x, func_type="aot", bprop=bprop)
        self.fwd_nobias = ops.Custom(f"{lib}:LinearFwdNoBias", out_shape=lambda x, w: (x[0], w[0]),
                                     out_dtype=lambda x, w: x, func_type="aot", bprop=bprop_nobias)

    def construct(self, x, w, b=None):
        if b is None:
            return self.fwd_nobias(x, w)                                   # (N, M)
        return self.fwd(x, w, b)                                           # (N, M)


class BlasLinearProduct(nn.Cell):
    """OpenBLAS SGEMM kernels on CPU (the reference on Ascend); see the module docstring."""

    def __init__(self):
        super().__init__()
        self.device = kernel_device("BlasLinearProduct", "make_linear_product('reference')")
        self.impl = _CpuBlasLinear() if self.device == "CPU" else ReferenceLinearProduct()

    def construct(self, x, w, b=None):
        _check_inputs(x, w, b)
        return self.impl(x, w, b)


def make_linear_product(impl: str) -> nn.Cell:
    """The ``x w^T (+ b)`` cell named by ``impl``: 'blas' or 'reference'."""
    if impl == "blas":
        return BlasLinearProduct()
    if impl == "reference":
        return ReferenceLinearProduct()
    raise ValueError(f"unknown linear product impl {impl!r}; valid: {', '.join(LINEAR_PRODUCT_IMPLS)}")
