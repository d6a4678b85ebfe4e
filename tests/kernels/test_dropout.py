"""Dropout: the fused CPU kernel (counter-based bits, 1-byte mask) and MindSpore's nn.Dropout (the reference).

What is checked, on the fused cell and, where it applies, on the reference too:
* y = x * scale where kept and 0 elsewhere, dx = dy * scale through the same mask, exactly (float32 products);
* statistics over 2^19 elements (seeded draws), each within 6 standard deviations (8 for MindSpore's CPU Dropout,
  whose tails measured heavier than binomial): the kept fraction is 1 - p, two calls' masks agree on
  p^2 + (1-p)^2 of the elements (independent draws), neighbouring elements are both dropped with probability p^2
  (overlapping pairs share an element: variance p^2 (1 - p^2) / n * (1 + 2p / (1 + p))), and two cells' masks are
  independent;
* seeding: the same ``set_seed`` gives the same masks in a new model; eval mode and p = 0 are the identity;
* under activation recomputation the backward uses the forward's mask;
* argument errors and the kernels' return codes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, nn, ops

from ms_llm.kernels._build import build_library
from ms_llm.kernels.dropout import FusedDropout, ReferenceDropout, make_dropout
from ms_llm.layers.common import dropout

SHAPE = (512, 1024)                    # 2^19 elements
N = SHAPE[0] * SHAPE[1]


def within(observed, expected_p, n=N, sigmas=6.0, var_factor=1.0):
    """|observed - expected_p| within `sigmas` standard deviations of a mean of n Bernoulli(expected_p) draws (times
    `var_factor` for dependent indicators)."""
    return abs(observed - expected_p) <= sigmas * math.sqrt(var_factor * expected_p * (1 - expected_p) / n)


def pair_var_factor(p):
    """Both-dropped indicators of overlapping neighbour pairs are 1-dependent: Cov = p^3 (1 - p) between adjacent
    pairs, so the variance of their mean is the binomial one times 1 + 2p / (1 + p)."""
    return 1.0 + 2.0 * p / (1.0 + p)


def _inputs(seed, shape=SHAPE, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.5, 2.0, shape) * rng.choice([-1.0, 1.0], shape)     # never 0: y == 0 means dropped
    return x.astype(dtype), rng.standard_normal(shape).astype(dtype)


def _train(cell):
    cell.set_train(True)
    return cell


@pytest.mark.parametrize("cls", [FusedDropout, ReferenceDropout])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_mask_scale_and_statistics(unary_grad, cls, p):
    ms.set_seed(7)                                                          # both cells seed from it
    x, dy = _inputs(1)
    net = unary_grad(_train(cls(p)))
    y1, dx1 = (t.asnumpy() for t in net(Tensor(x), Tensor(dy)))
    y2, _ = (t.asnumpy() for t in net(Tensor(x), Tensor(dy)))
    scale = np.float32(1.0 / (1.0 - p))
    keep1, keep2 = y1 != 0, y2 != 0
    np.testing.assert_array_equal(y1, np.where(keep1, x * scale, 0.0).astype(np.float32))
    np.testing.assert_array_equal(dx1, np.where(keep1, dy * scale, 0.0).astype(np.float32))
    sig = 6.0 if cls is FusedDropout else 8.0
    assert within(keep1.mean(), 1 - p, sigmas=sig)
    assert within((keep1 == keep2).mean(), p * p + (1 - p) * (1 - p), sigmas=sig)   # a fresh mask on every call
    dropped = ~keep1
    f = pair_var_factor(p)
    assert within((dropped[:, 1:] & dropped[:, :-1]).mean(), p * p, n=SHAPE[0] * (SHAPE[1] - 1), sigmas=sig,
                  var_factor=f)
    assert within((dropped[1:] & dropped[:-1]).mean(), p * p, n=(SHAPE[0] - 1) * SHAPE[1], sigmas=sig, var_factor=f)


def test_cells_draw_independent_masks_and_seeding_repeats_them():
    x, _ = _inputs(2)
    ms.set_seed(11)
    a, b = _train(FusedDropout(0.3)), _train(FusedDropout(0.3))
    masks = [(a(Tensor(x)).asnumpy() != 0) for _ in range(2)] + [b(Tensor(x)).asnumpy() != 0]
    assert within((masks[0] == masks[2]).mean(), 0.3 ** 2 + 0.7 ** 2)      # two cells: independent
    ms.set_seed(11)
    a2 = _train(FusedDropout(0.3))                                          # a new model after the same set_seed
    again = [(a2(Tensor(x)).asnumpy() != 0) for _ in range(2)]
    np.testing.assert_array_equal(again[0], masks[0])
    np.testing.assert_array_equal(again[1], masks[1])
    c, d = _train(FusedDropout(0.3, seed=123)), _train(FusedDropout(0.3, seed=123))
    np.testing.assert_array_equal(c(Tensor(x)).asnumpy(), d(Tensor(x)).asnumpy())


@pytest.mark.parametrize("cls", [FusedDropout, ReferenceDropout])
def test_eval_mode_and_p0_are_the_identity(cls):
    x, _ = _inputs(3, (4, 8))
    cell = cls(0.5)
    cell.set_train(False)
    np.testing.assert_array_equal(cell(Tensor(x)).asnumpy(), x)
    np.testing.assert_array_equal(_train(cls(0.0))(Tensor(x)).asnumpy(), x)


def test_float16_input_takes_the_reference():
    x, _ = _inputs(4, (64, 64), np.float16)
    y = _train(FusedDropout(0.25))(Tensor(x)).asnumpy()
    assert y.dtype == np.float16
    keep = y != 0
    np.testing.assert_allclose(y[keep], (x[keep] * np.float16(4 / 3)), rtol=2e-3)
    assert 0.6 < keep.mean() < 0.9


class _Recomputed(nn.Cell):
    """y = exp(drop(x)) * w, the whole cell marked for recomputation as ``parallel.recompute`` marks blocks: the
    backward re-runs the forward; were the dropout re-drawn there, the gradient would follow another mask than y."""

    def __init__(self, drop):
        super().__init__()
        self.drop = drop
        self.w = ms.Parameter(Tensor(np.linspace(0.5, 1.5, SHAPE[1]).astype(np.float32)), name="w")
        self.recompute()

    def construct(self, x):
        return ops.exp(self.drop(x)) * self.w                         # exp: its backward needs the forward output


@pytest.mark.parametrize("cls", [FusedDropout, ReferenceDropout])
def test_recomputation_keeps_the_forward_mask(unary_grad, cls):
    x, dy = _inputs(5)
    net = unary_grad(_train(_Recomputed(cls(0.5))))
    y, dx = (t.asnumpy() for t in net(Tensor(x), Tensor(dy)))
    w = np.linspace(0.5, 1.5, SHAPE[1]).astype(np.float32)
    keep = ~np.isclose(y, w)                                          # exp(0) * w where dropped
    expected = np.where(keep, dy * w * np.exp(np.where(keep, x * 2.0, 0.0)) * 2.0, 0.0)
    np.testing.assert_allclose(dx, expected, rtol=1e-5, atol=1e-6)


def test_layers_take_the_fused_cell_on_cpu():
    assert isinstance(dropout(0.1), FusedDropout if ms.get_context("device_target") == "CPU" else nn.Dropout)
    assert isinstance(dropout(0.0), nn.Identity)


def test_bad_arguments():
    for p in (1.0, -0.1, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match=r"dropout: p must be a float in \[0, 1\)"):
            FusedDropout(p)
    with pytest.raises(ValueError, match=r"dropout: seed must be None or an int in \[0, 2\^52\)"):
        FusedDropout(0.1, seed=2 ** 60)
    with pytest.raises(ValueError, match="unknown dropout impl 'fast'; valid: reference, fused"):
        make_dropout("fast", 0.1)
    assert isinstance(make_dropout("reference", 0.1), ReferenceDropout)


def test_kernel_return_codes(aot_call):
    import ctypes
    lib = ctypes.CDLL(build_library("dropout.cc"))
    x = np.ones((2, 3), np.float32)
    y, mask = np.zeros_like(x), np.zeros((2, 3), np.uint8)
    good = np.array([0.5, 2.0, 7.0, 0.0], np.float64)
    s, p4 = [(2, 3)], [(4,)]
    fwd_dtypes = ["float32", "float64", "float32", "uint8"]
    assert aot_call(lib.DropoutFwd, [x, good, y, mask], s + p4 + s + s, fwd_dtypes) == 0
    assert set(np.unique(mask)) <= {0, 1} and np.array_equal(y, mask * np.float32(2.0))
    assert aot_call(lib.DropoutFwd, [x, good, y, mask], s + p4 + s + s, fwd_dtypes, nparam=3) == 1
    assert aot_call(lib.DropoutFwd, [x, good, y, mask], s + p4 + [(3, 2)] + s, fwd_dtypes) == 2
    assert aot_call(lib.DropoutFwd, [x, good, y, mask], s + [(3,)] + s + s, fwd_dtypes) == 2
    assert aot_call(lib.DropoutFwd, [x, good, y, mask], s + p4 + s + s, fwd_dtypes[:3] + ["float32"]) == 3
    for bad in ([1.0, 2.0, 7.0, 0.0], [0.5, 0.0, 7.0, 0.0], [0.5, 2.0, 7.5, 0.0], [0.5, 2.0, 7.0, -1.0]):
        params = np.array(bad, np.float64)
        assert aot_call(lib.DropoutFwd, [x, params, y, mask], s + p4 + s + s, fwd_dtypes) == 4, bad
    dx = np.zeros_like(x)
    bwd_dtypes = ["float32", "uint8", "float64", "float32"]
    assert aot_call(lib.DropoutBwd, [x, mask, good, dx], s + s + p4 + s, bwd_dtypes) == 0
    np.testing.assert_array_equal(dx, y)
    float_mask = ["float32", "float32", "float64", "float32"]
    assert aot_call(lib.DropoutBwd, [x, mask, good, dx], s + s + p4 + s, float_mask) == 3
