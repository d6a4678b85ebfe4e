"""The one-parameter AdamW update: the fused C++ kernel (CPU, in place) and MindSpore's AdamWeightDecay against float64
numpy, a skipped step (apply = 0, gradient inf/NaN) changing nothing, shape/dtype errors, the kernel's return codes
and the impl selection.

Tolerance: |param - ref| <= 1e-6 + 1e-5 |ref| after three steps (float32 rounding of a handful of operations per
element; a wrong scalar or a missed element is of order lr = 1e-2).
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

import mindspore as ms
from mindspore import Parameter, Tensor, nn

from ms_llm.kernels._build import build_library
from ms_llm.kernels.adamw import (AdamWUpdateReference, FusedAdamWUpdate, make_adamw_update,
                                  select_adamw_impl)

ON_CPU = ms.get_context("device_target") == "CPU"


class _Step(nn.Cell):
    def __init__(self, update, shape, init):
        super().__init__()
        self.update = update
        self.param = Parameter(Tensor(init), name="p")
        self.m = Parameter(Tensor(np.zeros(shape, np.float32)), name="m")
        self.v = Parameter(Tensor(np.zeros(shape, np.float32)), name="v")

    def construct(self, grad, scalars, wd):
        return self.update(self.param, self.m, self.v, grad, scalars, wd)


def _numpy_step(p, m, v, g, sc, wd):
    lr, b1, b2, eps, dscale, gscale, apply = sc
    if apply == 0:
        return
    g = g * gscale
    m[...] = b1 * m + (1 - b1) * g
    v[...] = b2 * v + (1 - b2) * g * g
    p -= lr * (m / (np.sqrt(v) + eps) + wd * dscale * p)


@pytest.mark.skipif(not ON_CPU, reason="the C++ kernel runs on CPU")
@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (1000, 300)])   # the last one runs the kernel's threads
def test_update_matches_numpy_and_skips(impl, shape):
    rng = np.random.default_rng(0)
    init = rng.normal(size=shape).astype(np.float32)
    cell = _Step(make_adamw_update(impl), shape, init)
    p, m, v = init.astype(np.float64), np.zeros(shape), np.zeros(shape)
    steps = [([1e-2, 0.9, 0.999, 1e-8, 0.7, 0.5, 1.0], 0.1), ([2e-2, 0.8, 0.99, 1e-6, 1.0, 1.0, 1.0], 0.0),
             ([0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0], 0.1),                     # skipped (the optimizer's skip scalars)
             ([1e-2, 0.9, 0.999, 1e-8, 0.9, 2.0, 1.0], 0.1)]
    for i, (sc, wd) in enumerate(steps):
        g = rng.normal(size=shape).astype(np.float32)
        if sc[6] == 0:
            g[...] = np.inf if i % 2 else np.nan                              # an overflowed gradient
        token = cell(Tensor(g), Tensor(np.array(sc, np.float32)), Tensor(np.float32(wd)))
        assert token.shape == (1,)
        _numpy_step(p, m, v, g.astype(np.float64), sc, wd)
        for name, got, want in (("param", cell.param, p), ("m", cell.m, m), ("v", cell.v, v)):
            np.testing.assert_allclose(got.asnumpy(), want, rtol=1e-5, atol=1e-6, err_msg=f"{name} step {i}")


@pytest.mark.skipif(not ON_CPU, reason="the C++ kernel runs on CPU")
def test_errors_and_selection():
    cell = _Step(FusedAdamWUpdate(), (3, 4), np.zeros((3, 4), np.float32))
    sc = Tensor(np.array([1e-2, 0.9, 0.999, 1e-8, 1.0, 1.0, 1.0], np.float32))
    with pytest.raises(ValueError, match=r"must share one shape; got param \(3, 4\), m \(3, 4\), v \(3, 4\), "
                                         r"grad \(4, 3\)"):
        cell(Tensor(np.zeros((4, 3), np.float32)), sc, Tensor(np.float32(0)))
    with pytest.raises(ValueError, match=r"scalars must be \(7,\)"):
        cell(Tensor(np.zeros((3, 4), np.float32)), Tensor(np.zeros(6, np.float32)), Tensor(np.float32(0)))
    with pytest.raises(ValueError, match="grad must be float32, got Float16"):
        cell(Tensor(np.zeros((3, 4), np.float16)), sc, Tensor(np.float32(0)))
    assert select_adamw_impl("auto", "CPU") == "fused" and select_adamw_impl("auto", "Ascend") == "reference"
    assert select_adamw_impl("reference", "CPU") == "reference"
    assert isinstance(make_adamw_update("reference"), AdamWUpdateReference)
    with pytest.raises(ValueError, match="adamw impl must be one of"):
        select_adamw_impl("adam", "CPU")
    with pytest.raises(ValueError, match="unknown adamw impl"):
        make_adamw_update("auto")


@pytest.mark.skipif(not ON_CPU, reason="the aot kernel runs on CPU")
def test_kernel_return_codes(aot_call):
    """0 ok, 1 parameter count, 2 shapes, 3 dtypes (what ops.Custom would hand it if the Python checks were
    bypassed)."""
    fn = ctypes.CDLL(build_library("adamw.cc")).AdamWUpdate
    p, m, v, g = (np.ones((2, 3), np.float32) for _ in range(4))
    sc, wd, tok = np.array([1e-2, 0.9, 0.999, 1e-8, 1.0, 1.0, 1.0], np.float32), np.zeros(1, np.float32), \
        np.ones(1, np.float32)
    arrays = [p, m, v, g, sc, wd, tok]
    shapes = [(2, 3)] * 4 + [(7,), (), (1,)]
    assert aot_call(fn, arrays, shapes, ["float32"] * 7) == 0 and tok[0] == 0 and p[0, 0] != 1.0
    assert aot_call(fn, arrays, shapes, ["float32"] * 7, nparam=6) == 1
    assert aot_call(fn, arrays, [(2, 3), (2, 3), (3, 2), (2, 3), (7,), (), (1,)], ["float32"] * 7) == 2
    assert aot_call(fn, arrays, [(2, 3)] * 4 + [(6,), (), (1,)], ["float32"] * 7) == 2
    assert aot_call(fn, arrays, [(2, 3)] * 4 + [(7,), (2,), (1,)], ["float32"] * 7) == 2
    assert aot_call(fn, arrays, shapes, ["float32"] * 3 + ["float16"] + ["float32"] * 3) == 3
