"""The fused LayerNorm (C++ aot forward + backward on CPU) and MindSpore's ops.LayerNorm against float64 numpy:
outputs and the gradients of x, gamma and beta; shape/dtype errors; the kernels' return codes; the model's LayerNorm
using it on CPU.

Tolerances: y within 1e-5 + 1e-5 |y|; dx, dgamma, dbeta within 2e-5 of their largest magnitude (float32 row sums of
H <= 768 terms; dgamma / dbeta sum over up to 600 rows; a wrong term is of order 1).
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, nn, ops

from ms_llm.kernels._build import build_library
from ms_llm.kernels.layer_norm import FusedLayerNorm, ReferenceLayerNorm, make_layer_norm
from ms_llm.layers.norm import LayerNorm

ON_CPU = ms.get_context("device_target") == "CPU"


def numpy_layer_norm(x, g, b, dy, eps):
    """(y, dx, dgamma, dbeta) in float64."""
    x, g, b, dy = (a.astype(np.float64) for a in (x, g, b, dy))
    mu = x.mean(-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)
    xhat = (x - mu) * rstd
    y = xhat * g + b
    gx = dy * g
    dx = rstd * (gx - gx.mean(-1, keepdims=True) - xhat * (gx * xhat).mean(-1, keepdims=True))
    h = x.shape[-1]
    return y, dx, (dy * xhat).reshape(-1, h).sum(0), dy.reshape(-1, h).sum(0)


class _Grad(nn.Cell):
    def __init__(self, cell):
        super().__init__()
        self.cell = cell
        self.grad = ops.GradOperation(get_all=True, sens_param=True)

    def construct(self, x, g, b, dy):
        return self.cell(x, g, b), self.grad(self.cell)(x, g, b, dy)


@pytest.mark.skipif(not ON_CPU, reason="the C++ kernels run on CPU")
@pytest.mark.parametrize("shape", [(5, 768), (2, 3, 100), (600, 64), (1, 7)])   # 600 x 64 runs the threads
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_matches_numpy(pynative, impl, shape):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    h = shape[-1]
    g = (1 + 0.3 * rng.standard_normal(h)).astype(np.float32)
    b = rng.standard_normal(h).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    y, (dx, dg, db) = _Grad(make_layer_norm(impl, 1e-5))(*(Tensor(a) for a in (x, g, b, dy)))
    ry, rdx, rdg, rdb = numpy_layer_norm(x, g, b, dy, 1e-5)
    np.testing.assert_allclose(y.asnumpy(), ry, rtol=1e-5, atol=1e-5)
    for name, got, want in (("dx", dx, rdx), ("dgamma", dg, rdg), ("dbeta", db, rdb)):
        err = np.abs(got.asnumpy() - want).max() / np.abs(want).max()
        assert err <= 2e-5, f"{impl} {name}: {err:.3g}"


@pytest.mark.skipif(not ON_CPU, reason="the C++ kernels run on CPU")
def test_errors_and_model_layer_norm(pynative):
    cell = FusedLayerNorm(1e-5)
    with pytest.raises(ValueError, match=r"gamma and beta must be \(H,\) with H = x.shape\[-1\]; got x \(2, 8\), "
                                         r"gamma \(7,\)"):
        cell(Tensor(np.zeros((2, 8), np.float32)), Tensor(np.ones(7, np.float32)), Tensor(np.zeros(7, np.float32)))
    with pytest.raises(ValueError, match="must be float32"):
        cell(Tensor(np.zeros((2, 8), np.float16)), Tensor(np.ones(8, np.float32)), Tensor(np.zeros(8, np.float32)))
    with pytest.raises(ValueError, match="unknown layer norm impl"):
        make_layer_norm("apex", 1e-5)
    assert isinstance(make_layer_norm("reference", 1e-5), ReferenceLayerNorm)
    norm = LayerNorm(16, eps=1e-6, has_bias=False)                            # the model's norm: fused on CPU
    assert isinstance(norm.fused, FusedLayerNorm)
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float16)
    y = norm(Tensor(x)).asnumpy()                                             # float16 in and out, float32 inside
    assert y.dtype == np.float16
    ref = numpy_layer_norm(x, np.ones(16), np.zeros(16), np.zeros_like(x), 1e-6)[0]
    np.testing.assert_allclose(y.astype(np.float64), ref, atol=2e-3)


@pytest.mark.skipif(not ON_CPU, reason="the aot kernels run on CPU")
def test_kernel_return_codes(aot_call):
    """0 ok, 1 parameter count, 2 shapes, 3 dtypes (what ops.Custom would hand them if the Python checks were
    bypassed)."""
    lib = ctypes.CDLL(build_library("layer_norm.cc"))
    x, g, b = np.ones((4, 6), np.float32), np.ones(6, np.float32), np.zeros(6, np.float32)
    prm, y, mean, rstd = np.array([1e-5], np.float32), np.zeros((4, 6), np.float32), np.zeros(4, np.float32), \
        np.zeros(4, np.float32)
    fwd = [x, g, b, prm, y, mean, rstd]
    shapes = [(4, 6), (6,), (6,), (1,), (4, 6), (4,), (4,)]
    assert aot_call(lib.LayerNormFwd, fwd, shapes, ["float32"] * 7) == 0 and rstd[0] > 0
    assert aot_call(lib.LayerNormFwd, fwd, shapes, ["float32"] * 7, nparam=6) == 1
    assert aot_call(lib.LayerNormFwd, fwd, [(4, 6), (5,)] + shapes[2:], ["float32"] * 7) == 2
    assert aot_call(lib.LayerNormFwd, fwd, shapes[:5] + [(3,), (4,)], ["float32"] * 7) == 2
    assert aot_call(lib.LayerNormFwd, fwd, shapes, ["float16"] + ["float32"] * 6) == 3
    dx, dg, db = np.zeros((4, 6), np.float32), np.zeros(6, np.float32), np.zeros(6, np.float32)
    bwd = [x, g, mean, rstd, np.ones((4, 6), np.float32), dx, dg, db]
    bshapes = [(4, 6), (6,), (4,), (4,), (4, 6), (4, 6), (6,), (6,)]
    assert aot_call(lib.LayerNormBwd, bwd, bshapes, ["float32"] * 8) == 0 and db[0] == 4.0
    assert aot_call(lib.LayerNormBwd, bwd, bshapes, ["float32"] * 8, nparam=7) == 1
    assert aot_call(lib.LayerNormBwd, bwd, bshapes[:4] + [(4, 5)] + bshapes[5:], ["float32"] * 8) == 2
    assert aot_call(lib.LayerNormBwd, bwd, bshapes, ["float32"] * 7 + ["int32"]) == 3
