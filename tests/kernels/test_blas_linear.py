"""The OpenBLAS linear product (C++ aot forward + backward on CPU) and MindSpore's MatMul + Add against float64
numpy: y = x w^T + b and the gradients of x, w and b, with and without bias; shapes that leave threads without
rows; shape/dtype errors; the kernels' return codes; the model's Linear and tied heads taking it on CPU.

Tolerances: y, dx, dw within 1e-5 of their largest magnitude plus 1e-5 relative (float32 sums of up to 640 terms
of order 1; a wrong term or a wrong row block is of order 1); db within 1e-5 relative to its largest magnitude.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, nn, ops

from ms_llm.kernels._build import build_library
from ms_llm.kernels.blas_linear import BlasLinearProduct, ReferenceLinearProduct, make_linear_product
from ms_llm.layers.linear import BLAS_MIN_ROWS, Linear

ON_CPU = ms.get_context("device_target") == "CPU"


class _Grad(nn.Cell):
    def __init__(self, cell, bias):
        super().__init__()
        self.cell = cell
        self.bias = bias
        self.grad = ops.GradOperation(get_all=True, sens_param=True)

    def construct(self, x, w, b, dy):
        if self.bias:
            return self.cell(x, w, b), self.grad(self.cell)(x, w, b, dy)
        return self.cell(x, w), self.grad(self.cell)(x, w, dy)


def _close(got, want, what):
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
    assert err <= 2e-5, f"{what}: relative error {err:.3g}"


@pytest.mark.skipif(not ON_CPU, reason="the C++ kernels run on CPU")
# (257, 96, 130): blocks of rows on the threads; (48, 96, 700): a wider output, blocks of w's rows / y's columns
@pytest.mark.parametrize("n, k, m", [(64, 48, 40), (1, 5, 3), (3, 640, 2), (257, 96, 130), (48, 96, 700)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("impl", ["blas", "reference"])
def test_matches_numpy(impl, bias, n, k, m):
    rng = np.random.default_rng(n + k + m)
    x, w = rng.standard_normal((n, k)).astype(np.float32), rng.standard_normal((m, k)).astype(np.float32)
    b, dy = rng.standard_normal(m).astype(np.float32), rng.standard_normal((n, m)).astype(np.float32)
    y, grads = _Grad(make_linear_product(impl), bias)(*(Tensor(a) for a in (x, w, b, dy)))
    x64, w64, dy64 = x.astype(np.float64), w.astype(np.float64), dy.astype(np.float64)
    _close(y.asnumpy(), x64 @ w64.T + (b if bias else 0), "y")
    _close(grads[0].asnumpy(), dy64 @ w64, "dx")
    _close(grads[1].asnumpy(), dy64.T @ x64, "dw")
    if bias:
        _close(grads[2].asnumpy(), dy64.sum(0), "db")
    assert len(grads) == (3 if bias else 2)


@pytest.mark.skipif(not ON_CPU, reason="the C++ kernels run on CPU")
def test_errors(pynative):
    cell = BlasLinearProduct()
    x, w = Tensor(np.zeros((4, 8), np.float32)), Tensor(np.zeros((5, 8), np.float32))
    with pytest.raises(ValueError, match=r"x must be \(N, K\) and w \(M, K\); got x \(4, 8\), w \(5, 7\)"):
        cell(x, Tensor(np.zeros((5, 7), np.float32)))
    with pytest.raises(ValueError, match=r"b must be \(M,\) with M = w.shape\[0\]; got x \(4, 8\), w \(5, 8\), "
                                         r"b \(4,\)"):
        cell(x, w, Tensor(np.zeros(4, np.float32)))
    with pytest.raises(ValueError, match="inputs must be float32; got Float16, Float32"):
        cell(Tensor(np.zeros((4, 8), np.float16)), w)
    with pytest.raises(ValueError, match="unknown linear product impl"):
        make_linear_product("mkl")
    assert isinstance(make_linear_product("reference"), ReferenceLinearProduct)


@pytest.mark.skipif(not ON_CPU, reason="the C++ kernels run on CPU")
def test_linear_takes_blas_from_min_rows(rng):
    """Linear on CPU: products of >= BLAS_MIN_ROWS rows go through OpenBLAS (bias added in the kernel), smaller ones
    through MatMul; both equal numpy, in training (forward + backward) and inference."""
    lin = Linear(24, 40)
    assert isinstance(lin.blas, BlasLinearProduct)
    w, b = rng.standard_normal((40, 24)).astype(np.float32), rng.standard_normal(40).astype(np.float32)
    lin.weight.set_data(Tensor(w))
    lin.bias.set_data(Tensor(b))
    grad = ops.GradOperation(get_by_list=True, sens_param=True)
    params = ms.ParameterTuple(lin.trainable_params())
    for rows in (BLAS_MIN_ROWS - 1, BLAS_MIN_ROWS, 2 * BLAS_MIN_ROWS + 3):
        x = rng.standard_normal((1, rows, 24)).astype(np.float32)
        dy = rng.standard_normal((1, rows, 40)).astype(np.float32)
        _close(lin(Tensor(x)).asnumpy(), x.astype(np.float64) @ w.T + b, f"y, {rows} rows")
        dw, db = grad(lin, params)(Tensor(x), Tensor(dy))
        _close(dw.asnumpy(), dy[0].T.astype(np.float64) @ x[0], f"dw, {rows} rows")
        _close(db.asnumpy(), dy[0].sum(0, dtype=np.float64), f"db, {rows} rows")
    assert Linear(8, 8, compute_dtype="float16").blas is None                   # float16 products keep MatMul


@pytest.mark.skipif(not ON_CPU, reason="the aot kernels run on CPU")
def test_kernel_return_codes(aot_call):
    """0 ok, 1 parameter count, 2 shapes, 3 dtypes (what ops.Custom would hand them if the Python checks were
    bypassed)."""
    lib = ctypes.CDLL(build_library("blas_linear.cc"))
    f32 = ["float32"] * 6
    x, w, b, y = np.ones((3, 4), np.float32), np.ones((2, 4), np.float32), np.array([1, 2], np.float32), \
        np.zeros((3, 2), np.float32)
    assert aot_call(lib.LinearFwd, [x, w, b, y], [(3, 4), (2, 4), (2,), (3, 2)], f32[:4]) == 0
    np.testing.assert_array_equal(y, [[5, 6]] * 3)
    assert aot_call(lib.LinearFwdNoBias, [x, w, y], [(3, 4), (2, 4), (3, 2)], f32[:3]) == 0
    np.testing.assert_array_equal(y, [[4, 4]] * 3)
    assert aot_call(lib.LinearFwd, [x, w, b, y], [(3, 4), (2, 4), (2,), (3, 2)], f32[:4], nparam=3) == 1
    assert aot_call(lib.LinearFwd, [x, w, b, y], [(3, 4), (2, 5), (2,), (3, 2)], f32[:4]) == 2
    assert aot_call(lib.LinearFwd, [x, w, b, y], [(3, 4), (2, 4), (3,), (3, 2)], f32[:4]) == 2
    assert aot_call(lib.LinearFwdNoBias, [x, w, y], [(3, 4), (2, 4), (2, 3)], f32[:3]) == 2
    assert aot_call(lib.LinearFwd, [x, w, b, y], [(3, 4), (2, 4), (2,), (3, 2)], ["float16"] + f32[:3]) == 3
    dy, dx, dw, db = np.ones((3, 2), np.float32), np.zeros((3, 4), np.float32), np.zeros((2, 4), np.float32), \
        np.zeros(2, np.float32)
    shapes = [(3, 4), (2, 4), (3, 2), (3, 4), (2, 4), (2,)]
    assert aot_call(lib.LinearBwd, [x, w, dy, dx, dw, db], shapes, f32) == 0
    assert (dx == 2).all() and (dw == 3).all() and (db == 3).all()
    assert aot_call(lib.LinearBwdNoBias, [x, w, dy, dx, dw], shapes[:5], f32[:5]) == 0
    assert aot_call(lib.LinearBwd, [x, w, dy, dx, dw, db], shapes, f32, nparam=5) == 1
    assert aot_call(lib.LinearBwd, [x, w, dy, dx, dw, db], shapes[:2] + [(3, 3)] + shapes[3:], f32) == 2
    assert aot_call(lib.LinearBwd, [x, w, dy, dx, dw, db], shapes[:5] + [(3,)], f32) == 2
    assert aot_call(lib.LinearBwd, [x, w, dy, dx, dw, db], shapes, f32[:5] + ["int32"]) == 3
