"""The fused GELU (C++ aot forward + backward on CPU) and MindSpore's ops, exact (erf) and tanh forms, against
float64 numpy (math.erf / np.tanh of the textbook formulas); dtype and kind errors; the kernels' return codes; the
model's Activation taking it on CPU.

Tolerances: y and dx within 2e-6 + 2e-6 |value| (the kernel's erf is Abramowitz & Stegun 7.1.26, absolute error
<= 1.5e-7, times |x| <= 12 here; MindSpore's own ops land within 3e-6 as well); a wrong formula is off by >= 1e-3.
"""

from __future__ import annotations

import ctypes
import math

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor

from ms_llm.kernels._build import build_library
from ms_llm.kernels.gelu import FusedGelu, ReferenceGelu, make_gelu
from ms_llm.layers.mlp import Activation

ON_CPU = ms.get_context("device_target") == "CPU"


def numpy_gelu(kind, x, dy):
    """(y, dx) in float64."""
    x = x.astype(np.float64)
    if kind == "gelu":
        cdf = 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
        return x * cdf, dy * (cdf + x * np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi))
    c = math.sqrt(2.0 / math.pi)
    t = np.tanh(c * (x + 0.044715 * x ** 3))
    return 0.5 * x * (1 + t), dy * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x))


@pytest.mark.skipif(not ON_CPU, reason="the C++ kernels run on CPU")
@pytest.mark.parametrize("shape", [(7,), (3, 5, 33), (300, 400)])        # 300 x 400 runs the threads
@pytest.mark.parametrize("kind", ["gelu", "gelu_new"])
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_matches_numpy(pynative, unary_grad, impl, kind, shape):
    rng = np.random.default_rng(len(shape))
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    flat = x.reshape(-1)
    flat[:7] = [0.0, -0.0, 1e-30, -9.0, 9.0, 12.0, -12.0]                 # signs, tiny, both tails
    dy = rng.standard_normal(shape).astype(np.float32)
    y, dx = unary_grad(make_gelu(impl, kind))(Tensor(x), Tensor(dy))
    ry, rdx = numpy_gelu(kind, x, dy)
    np.testing.assert_allclose(y.asnumpy(), ry, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(dx.asnumpy(), rdx, rtol=2e-6, atol=2e-6)


@pytest.mark.skipif(not ON_CPU, reason="the C++ kernels run on CPU")
def test_errors_and_model_activation(pynative):
    with pytest.raises(ValueError, match="x must be float32; got Float16 of shape"):
        FusedGelu("gelu")(Tensor(np.zeros((2, 3), np.float16)))
    with pytest.raises(ValueError, match="gelu kind must be one of 'gelu', 'gelu_new'; got 'swish'"):
        make_gelu("fused", "swish")
    with pytest.raises(ValueError, match="unknown gelu impl"):
        make_gelu("onednn", "gelu")
    assert isinstance(make_gelu("reference", "gelu"), ReferenceGelu)
    assert isinstance(Activation("gelu").fused, FusedGelu) and isinstance(Activation("gelu_new").fused, FusedGelu)
    assert Activation("relu").fused is None and Activation("gelu", fused=False).fused is None
    x = np.linspace(-5, 5, 24, dtype=np.float32).reshape(2, 12)
    for name in ("gelu", "gelu_new"):                                        # float32 -> kernel, float16 -> ops
        ref = numpy_gelu(name, x, x)[0]
        np.testing.assert_allclose(Activation(name)(Tensor(x)).asnumpy(), ref, rtol=2e-6, atol=2e-6)
        y16 = Activation(name)(Tensor(x.astype(np.float16))).asnumpy()
        assert y16.dtype == np.float16
        np.testing.assert_allclose(y16.astype(np.float64), ref, rtol=2e-3, atol=2e-3)


@pytest.mark.skipif(not ON_CPU, reason="the aot kernels run on CPU")
def test_kernel_return_codes(aot_call):
    """0 ok, 1 parameter count, 2 shapes, 3 dtypes, 4 kind (what ops.Custom would hand them if the Python checks
    were bypassed)."""
    lib = ctypes.CDLL(build_library("gelu.cc"))
    x, y, p = np.array([[1.0, -1.0]], np.float32), np.zeros((1, 2), np.float32), np.zeros(1, np.float32)
    f32 = ["float32"] * 4
    assert aot_call(lib.GeluFwd, [x, p, y], [(1, 2), (1,), (1, 2)], f32[:3]) == 0
    np.testing.assert_allclose(y, numpy_gelu("gelu", x, x)[0], atol=1e-6)
    assert aot_call(lib.GeluFwd, [x, p, y], [(1, 2), (1,), (1, 2)], f32[:3], nparam=2) == 1
    assert aot_call(lib.GeluFwd, [x, p, y], [(1, 2), (1,), (2, 1)], f32[:3]) == 2
    assert aot_call(lib.GeluFwd, [x, p, y], [(1, 2), (2,), (1, 2)], f32[:3]) == 2
    assert aot_call(lib.GeluFwd, [x, p, y], [(1, 2), (1,), (1, 2)], ["float16"] + f32[:2]) == 3
    bad_kind = np.array([2.0], np.float32)
    assert aot_call(lib.GeluFwd, [x, bad_kind, y], [(1, 2), (1,), (1, 2)], f32[:3]) == 4
    dx = np.zeros((1, 2), np.float32)
    assert aot_call(lib.GeluBwd, [x, x, p, dx], [(1, 2), (1, 2), (1,), (1, 2)], f32) == 0
    np.testing.assert_allclose(dx, numpy_gelu("gelu", x, x)[1], atol=1e-6)
    assert aot_call(lib.GeluBwd, [x, x, p, dx], [(1, 2), (1, 2), (1,), (1, 2)], f32, nparam=3) == 1
    assert aot_call(lib.GeluBwd, [x, x, p, dx], [(1, 2), (2, 1), (1,), (1, 2)], f32) == 2
    assert aot_call(lib.GeluBwd, [x, x, p, dx], [(1, 2), (1, 2), (1,), (1, 2)], f32[:3] + ["int32"]) == 3
    assert aot_call(lib.GeluBwd, [x, x, bad_kind, dx], [(1, 2), (1, 2), (1,), (1, 2)], f32) == 4
