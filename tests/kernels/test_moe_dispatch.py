"""MoE dispatch/combine: the fused CPU kernels and the reference ops against a float64 numpy transcription of the
contract (``ms_llm/kernels/moe_dispatch.py``), values and gradients; the float16 fallback; errors; the kernels'
return codes.

Tolerances: dispatch is a copy (exact); sums over a token's slots (combine, dx) and the weight gradient (a dot
product over H) within 1e-5 of the largest magnitude (float32 rounding of sums of <= E * C terms); a wrong index or a
missing weight is off by O(1).
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, nn, ops

from ms_llm.kernels._build import build_library
from ms_llm.kernels.moe_dispatch import (FusedMoEDispatch, ReferenceMoEDispatch, make_moe_dispatch,
                                         resolve_moe_dispatch_impl)

ON_CPU = ms.get_context("device_target") == "CPU"


class DispatchAndCombine(nn.Cell):
    """``(dispatch(x), combine(y))`` and the gradients of x, y and slot_weight for cotangents (dslots, dout)."""

    def __init__(self, cell):
        super().__init__()
        self.cell = cell
        self.grad = ops.GradOperation(get_all=True, sens_param=True)

    def forward(self, x, slot_token, slot_weight, y):
        return self.cell.dispatch(x, slot_token), self.cell.combine(y, slot_token, slot_weight, x.shape[1])

    def construct(self, x, slot_token, slot_weight, y, dslots, dout):
        grads = self.grad(self.forward)(x, slot_token, slot_weight, y, (dslots, dout))
        return self.forward(x, slot_token, slot_weight, y), grads[0], grads[2], grads[3]


def numpy_reference(x, slot_token, slot_weight, y, dslots, dout):
    """(slots, out, dx, dslot_weight, dy) in float64, loops straight from the contract."""
    x, y, w = x.astype(np.float64), y.astype(np.float64), slot_weight.astype(np.float64)
    dslots, dout = dslots.astype(np.float64), dout.astype(np.float64)
    g_, e_, c_ = slot_token.shape
    slots = np.zeros((e_, g_, c_, x.shape[-1]))
    out, dx = np.zeros_like(x), np.zeros_like(x)
    dw, dy = np.zeros_like(w), np.zeros_like(y)
    for g, e, c in np.ndindex(g_, e_, c_):
        t = slot_token[g, e, c]
        slots[e, g, c] = x[g, t]
        dx[g, t] += dslots[e, g, c]
        out[g, t] += w[g, e, c] * y[e, g, c]
        dy[e, g, c] = w[g, e, c] * dout[g, t]
        dw[g, e, c] = y[e, g, c] @ dout[g, t]
    return slots, out, dx, dw, dy


def case(rng, g, t, e, c, h):
    """Random routing with repeated tokens, unrouted tokens and empty (weight 0) slots."""
    x = rng.standard_normal((g, t, h)).astype(np.float32)
    slot_token = rng.integers(0, max(1, t // 2), (g, e, c)).astype(np.int32)   # the upper half is never routed
    slot_weight = rng.random((g, e, c)).astype(np.float32)
    slot_weight[:, :, -1] = 0.0                                                 # empty slots
    slot_token[:, :, -1] = 0
    y = rng.standard_normal((e, g, c, h)).astype(np.float32)
    dslots = rng.standard_normal((e, g, c, h)).astype(np.float32)
    dout = rng.standard_normal((g, t, h)).astype(np.float32)
    return x, slot_token, slot_weight, y, dslots, dout


@pytest.mark.skipif(not ON_CPU, reason="the C++ kernels run on CPU")
@pytest.mark.parametrize("dims", [(1, 4, 1, 1, 3), (3, 10, 4, 5, 33), (2, 64, 8, 24, 300)],
                         ids=["tiny", "small", "threads"])   # 2 x 8 x 24 x 300 runs the threads; H=300: 2 blocks
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_matches_numpy(impl, dims):
    arrays = case(np.random.default_rng(sum(dims)), *dims)
    (slots, out), dx, dw, dy = DispatchAndCombine(make_moe_dispatch(impl))(*[Tensor(a) for a in arrays])
    want = numpy_reference(*arrays)
    np.testing.assert_array_equal(slots.asnumpy(), want[0].astype(np.float32))
    for name, got, ref in (("out", out, want[1]), ("dx", dx, want[2]), ("dslot_weight", dw, want[3]),
                           ("dy", dy, want[4])):
        np.testing.assert_allclose(got.asnumpy(), ref, rtol=0, atol=1e-5 * np.abs(ref).max(), err_msg=name)


@pytest.mark.skipif(not ON_CPU, reason="the C++ kernels run on CPU")
def test_fused_is_the_reference_for_float16(rng):
    """float16 tensors (mixed precision) take the reference ops inside the fused cell: same values as the
    reference cell."""
    x, slot_token, slot_weight, y, _, _ = case(rng, 2, 6, 3, 2, 8)
    fused, ref = FusedMoEDispatch(), ReferenceMoEDispatch()
    x16, y16 = Tensor(x.astype(np.float16)), Tensor(y.astype(np.float16))
    st, sw = Tensor(slot_token), Tensor(slot_weight)
    assert fused.dispatch(x16, st).dtype == ms.float16
    np.testing.assert_array_equal(fused.dispatch(x16, st).asnumpy(), ref.dispatch(x16, st).asnumpy())
    np.testing.assert_array_equal(fused.combine(y16, st, sw, 6).asnumpy(), ref.combine(y16, st, sw, 6).asnumpy())


def test_errors_name_the_tensor():
    cell = ReferenceMoEDispatch()
    x = Tensor(np.zeros((2, 5, 4), np.float32))
    st = Tensor(np.zeros((2, 3, 2), np.int32))
    with pytest.raises(ValueError, match=r"moe dispatch: x must be \(G, T, H\); got shape \(5, 4\)"):
        cell.dispatch(Tensor(np.zeros((5, 4), np.float32)), st)
    with pytest.raises(ValueError, match=r"slot_token must be int32 \(G, E, C\); got Int64 of shape \(2, 3, 2\)"):
        cell.dispatch(x, Tensor(np.zeros((2, 3, 2), np.int64)))
    with pytest.raises(ValueError, match=r"x of shape \(3, 5, 4\) does not match slot_token \(G, E, C\) = "
                                         r"\(2, 3, 2\)"):
        cell.dispatch(Tensor(np.zeros((3, 5, 4), np.float32)), st)
    with pytest.raises(ValueError, match=r"moe combine: y of shape \(3, 3, 2, 4\) does not match"):
        cell.combine(Tensor(np.zeros((3, 3, 2, 4), np.float32)), st, Tensor(np.zeros((2, 3, 2), np.float32)), 5)
    with pytest.raises(ValueError, match="unknown moe dispatch impl 'scatter'; valid: auto, reference, fused"):
        make_moe_dispatch("scatter")


def test_auto_resolution(monkeypatch):
    from ms_llm.kernels import moe_dispatch
    assert resolve_moe_dispatch_impl("reference") == "reference"
    assert resolve_moe_dispatch_impl("fused") == "fused"
    monkeypatch.setattr(moe_dispatch.ms, "get_context", lambda key: "CPU")
    assert resolve_moe_dispatch_impl("auto") == "fused"
    monkeypatch.setattr(moe_dispatch.ms, "get_context", lambda key: "Ascend")
    assert resolve_moe_dispatch_impl("auto") == "reference"     # what semi-auto parallelism shards


@pytest.mark.skipif(not ON_CPU, reason="the C++ kernels run on CPU")
def test_kernel_return_codes(aot_call):
    """0 ok, 1 parameter count, 2 shapes, 3 dtypes, 4 a slot token outside [0, T) (what ops.Custom would hand the
    kernels if the Python checks were bypassed)."""
    lib = ctypes.CDLL(build_library("moe_dispatch.cc"))
    g, t, e, c, h = 1, 3, 2, 2, 4
    x = np.arange(g * t * h, dtype=np.float32).reshape(g, t, h)
    st = np.array([[[2, 0], [1, 1]]], np.int32)
    w = np.array([[[0.5, 0.0], [1.0, 2.0]]], np.float32)
    slots = np.zeros((e, g, c, h), np.float32)
    spec = np.zeros(t, np.int8)
    out = np.zeros((g, t, h), np.float32)
    dx, dw = np.zeros_like(out), np.zeros_like(w)
    xs, sts, ss = (g, t, h), (g, e, c), (e, g, c, h)
    f32, i32 = "float32", "int32"
    assert aot_call(lib.MoeDispatchFwd, [x, st, slots], [xs, sts, ss], [f32, i32, f32]) == 0
    np.testing.assert_array_equal(slots[:, 0], x[0][st[0]])
    assert aot_call(lib.MoeDispatchFwd, [x, st, slots], [xs, sts, ss], [f32, i32, f32], nparam=2) == 1
    assert aot_call(lib.MoeDispatchFwd, [x, st, slots], [xs, sts, (e, g, c, h + 1)], [f32, i32, f32]) == 2
    assert aot_call(lib.MoeDispatchFwd, [x, st, slots], [xs, sts, ss], [f32, f32, f32]) == 3
    bad = np.array([[[3, 0], [1, 1]]], np.int32)
    assert aot_call(lib.MoeDispatchFwd, [x, bad, slots], [xs, sts, ss], [f32, i32, f32]) == 4
    assert aot_call(lib.MoeDispatchBwd, [slots, st, x, dx], [ss, sts, xs, xs], [f32, i32, f32, f32]) == 0
    np.testing.assert_array_equal(dx[0], [x[0, 0] * 1, x[0, 1] * 2, x[0, 2]])     # token 1 sits in two slots
    assert aot_call(lib.MoeDispatchBwd, [slots, st, x, dx], [ss, sts, xs, (g, t + 1, h)], [f32, i32, f32, f32]) == 2
    assert aot_call(lib.MoeDispatchBwd, [slots, bad, x, dx], [ss, sts, xs, xs], [f32, i32, f32, f32]) == 4
    assert aot_call(lib.MoeCombineFwd, [slots, st, w, spec, out], [ss, sts, sts, (t,), xs],
                    [f32, i32, f32, "int8", f32]) == 0
    np.testing.assert_allclose(out[0], [0.0 * x[0, 0], (1.0 + 2.0) * x[0, 1], 0.5 * x[0, 2]])
    assert aot_call(lib.MoeCombineFwd, [slots, st, w, spec, out], [ss, sts, sts, (t + 1,), xs],
                    [f32, i32, f32, "int8", f32]) == 2
    assert aot_call(lib.MoeCombineFwd, [slots, st, w, spec, out], [ss, sts, sts, (t,), xs],
                    [f32, i32, "float16", "int8", f32]) == 3
    dy = np.zeros_like(slots)
    assert aot_call(lib.MoeCombineBwd, [slots, st, w, out, dy, dw], [ss, sts, sts, xs, ss, sts],
                    [f32, i32, f32, f32, f32, f32]) == 0
    np.testing.assert_allclose(dw[0], np.einsum("ech,ech->ec", slots[:, 0], out[0][st[0]]))
    assert aot_call(lib.MoeCombineBwd, [slots, st, w, out, dy, dw], [ss, sts, sts, xs, ss, sts],
                    [f32, i32, f32, f32, f32, f32], nparam=5) == 1
    assert aot_call(lib.MoeCombineBwd, [slots, st, w, out, dy, dw], [ss, sts, (g, e, c + 1), xs, ss, sts],
                    [f32, i32, f32, f32, f32, f32]) == 2
    assert aot_call(lib.MoeCombineBwd, [slots, bad, w, out, dy, dw], [ss, sts, sts, xs, ss, sts],
                    [f32, i32, f32, f32, f32, f32]) == 4
