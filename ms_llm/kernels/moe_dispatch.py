"""MoE dispatch (tokens -> expert slots) and combine (weighted expert outputs -> tokens): a reference composite and a
fused op, same signature.

Both cells are built as ``cell = make_moe_dispatch(impl)`` and used through two methods, with G routing groups of T
tokens, E experts of C slots and hidden size H:

- ``cell.dispatch(x (G, T, H), slot_token (G, E, C) int32) -> slots (E, G, C, H)``: ``slots[e, g, c] =
  x[g, slot_token[g, e, c]]`` (expert-major: the layout the experts' batched products and the expert-parallel
  exchange take);
- ``cell.combine(y (E, G, C, H), slot_token, slot_weight (G, E, C) float32, tokens=T) -> (G, T, H)``:
  ``out[g, t] = sum of slot_weight[g, e, c] * y[e, g, c]`` over the slots holding token ``t`` (every slot counts,
  an empty one with weight 0; a token no slot holds gets 0, so only the residual carries it).

Gradients flow to ``x``, ``y`` and ``slot_weight`` (the router's gates); ``slot_token`` is an integer table.
``slot_token`` comes from the routers (:mod:`ms_llm.moe.router`, :mod:`ms_llm.kernels.moe_routing`), whose values
are in ``[0, T)`` by construction.

* :class:`ReferenceMoEDispatch`: MindSpore ops: a batched ``Gather`` of the slots, a ``Transpose`` to expert-major;
  back: a ``Transpose``, the weight ``Mul`` and an ``UnsortedSegmentSum``. Its :meth:`~ReferenceMoEDispatch.shard`
  gives the strategies where semi-auto parallelism turns (batch)-sharding into (expert)-sharding.
* :class:`FusedMoEDispatch`: on CPU for float32 tensors the C++ kernels of ``csrc/moe_dispatch.cc`` through
  ``ops.Custom(func_type="aot")`` with their backward kernels as bprops: one threaded pass per direction (gather
  rows straight into expert-major order; scatter-add with the weight applied, per (group, column block), so sums
  run in a fixed order). Reference otherwise (other dtypes, e.g. float16 under mixed precision; Ascend).
  Why: the composite moves every (E, G, C, H) activation 3-4 times per pass (``bench/results/moe_full.md``).

Values: dispatch is a copy (identical); combine and the gradients agree with the reference to float32 rounding
(the fused kernel may contract ``w * y + acc`` into one FMA; ``dslot_weight`` is a float64 dot product).
"""

from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops
from mindspore import dtype as mstype

from ._build import build_library
from ._device import kernel_device, resolve_auto

__all__ = ["MOE_DISPATCH_IMPLS", "ReferenceMoEDispatch", "FusedMoEDispatch", "make_moe_dispatch",
           "resolve_moe_dispatch_impl"]

MOE_DISPATCH_IMPLS = ("reference", "fused")


def _check(x_or_y, slot_token, what: str, slots: bool):
    """Shape and dtype errors before compilation, naming the tensor."""
    rank = 4 if slots else 3
    name = "y" if slots else "x"
    if x_or_y.ndim != rank:
        layout = "(E, G, C, H)" if slots else "(G, T, H)"
        raise ValueError(f"moe {what}: {name} must be {layout}; got shape {x_or_y.shape}")
    if slot_token.ndim != 3 or slot_token.dtype != mstype.int32:
        raise ValueError(f"moe {what}: slot_token must be int32 (G, E, C); got {slot_token.dtype} of shape "
                         f"{slot_token.shape}")
    g, e, c = slot_token.shape
    lead = (e, g, c) if slots else (g,)
    if tuple(x_or_y.shape[:len(lead)]) != lead:
        raise ValueError(f"moe {what}: {name} of shape {x_or_y.shape} does not match slot_token (G, E, C) = "
                         f"{slot_token.shape}")


class ReferenceMoEDispatch(nn.Cell):
    """MindSpore ops; see the module docstring."""

    def __init__(self):
        super().__init__()
        self.gather = ops.Gather(batch_dims=1)
        self.to_expert_major = ops.Transpose()
        self.to_group_major = ops.Transpose()

    def dispatch(self, x, slot_token):
        _check(x, slot_token, "dispatch", slots=False)
        g, e, c = slot_token.shape
        slots = self.gather(x, ops.reshape(slot_token, (g, e * c)), 1)          # (G, E*C, H)
        slots = ops.reshape(slots, (g, e, c, x.shape[-1]))                       # (G, E, C, H)
        return self.to_expert_major(slots, (1, 0, 2, 3))                         # (E, G, C, H)

    def combine(self, y, slot_token, slot_weight, tokens: int):
        _check(y, slot_token, "combine", slots=True)
        g, e, c = slot_token.shape
        h = y.shape[-1]
        y = self.to_group_major(y, (1, 0, 2, 3))                                 # (G, E, C, H)
        y = y * ops.expand_dims(ops.cast(slot_weight, y.dtype), -1)              # (G, E, C, H)
        offset = ops.reshape(ops.arange(g, dtype=ms.int32), (g, 1, 1)) * tokens  # (G, 1, 1)
        ids = ops.reshape(slot_token + offset, (-1,))                            # (G*E*C,) flat token index
        out = ops.unsorted_segment_sum(ops.reshape(y, (g * e * c, h)), ids, g * tokens)   # (G*T, H)
        return ops.reshape(out, (g, tokens, h))                                  # (G, T, H)

    def shard(self, sharder):
        sharder.shard(self.gather, "gather", ("batch", "seq", "embed"), ("batch", "capacity"))
        sharder.shard(self.to_expert_major, "to_expert_major", ("batch", "expert", "capacity", "embed"))
        sharder.shard(self.to_group_major, "to_group_major", ("expert", "batch", "capacity", "embed"))


class _CpuMoEDispatch(nn.Cell):
    """The aot C++ kernels with their backward kernels as bprops (float32 tensors only)."""

    def __init__(self):
        super().__init__()
        lib = build_library("moe_dispatch.cc")
        dispatch_bwd = ops.Custom(f"{lib}:MoeDispatchBwd", out_shape=lambda ds, st, x: x,
                                  out_dtype=lambda ds, st, x: x, func_type="aot")

        def dispatch_bprop(x, slot_token, out, dout):
            return dispatch_bwd(dout, slot_token, x), ops.zeros_like(slot_token)

        self.dispatch_fwd = ops.Custom(
            f"{lib}:MoeDispatchFwd",
            out_shape=lambda x, st: [st[1], st[0], st[2], x[2]],                 # (E, G, C, H)
            out_dtype=lambda x, st: x, func_type="aot", bprop=dispatch_bprop)
        combine_bwd = ops.Custom(f"{lib}:MoeCombineBwd", out_shape=lambda y, st, w, do: (y, w),
                                 out_dtype=lambda y, st, w, do: (y, w), func_type="aot")

        def combine_bprop(y, slot_token, slot_weight, spec, out, dout):
            dy, dweight = combine_bwd(y, slot_token, slot_weight, dout)
            return dy, ops.zeros_like(slot_token), dweight, ops.zeros_like(spec)

        self.combine_fwd = ops.Custom(
            f"{lib}:MoeCombineFwd",
            out_shape=lambda y, st, w, spec: [y[1], spec[0], y[3]],              # (G, T, H)
            out_dtype=lambda y, st, w, spec: y, func_type="aot", bprop=combine_bprop)

    def dispatch(self, x, slot_token):
        return self.dispatch_fwd(x, slot_token)

    def combine(self, y, slot_token, slot_weight, tokens: int):
        spec = ops.zeros((tokens,), mstype.int8)                                 # (T,) carries T to the kernel
        return self.combine_fwd(y, slot_token, slot_weight, spec)


class FusedMoEDispatch(nn.Cell):
    """The fused C++ kernels on CPU for float32 (the reference otherwise); see the module docstring."""

    def __init__(self):
        super().__init__()
        self.device = kernel_device("FusedMoEDispatch", "make_moe_dispatch('reference')")
        self.kernel = _CpuMoEDispatch() if self.device == "CPU" else None
        self.reference = ReferenceMoEDispatch()

    def dispatch(self, x, slot_token):
        _check(x, slot_token, "dispatch", slots=False)
        if self.kernel is not None and x.dtype == mstype.float32:
            return self.kernel.dispatch(x, slot_token)
        return self.reference.dispatch(x, slot_token)

    def combine(self, y, slot_token, slot_weight, tokens: int):
        _check(y, slot_token, "combine", slots=True)
        if self.kernel is not None and y.dtype == mstype.float32 and slot_weight.dtype == mstype.float32:
            return self.kernel.combine(y, slot_token, slot_weight, tokens)
        return self.reference.combine(y, slot_token, slot_weight, tokens)


def resolve_moe_dispatch_impl(impl: str) -> str:
    """'auto' -> 'fused' on CPU, 'reference' elsewhere (the reference is what semi-auto parallelism shards);
    'reference' and 'fused' unchanged."""
    return resolve_auto(impl, MOE_DISPATCH_IMPLS, "moe dispatch")


def make_moe_dispatch(impl: str) -> nn.Cell:
    """The dispatch/combine cell named by ``impl`` ('auto', 'fused' or 'reference')."""
    impl = resolve_moe_dispatch_impl(impl)
    return FusedMoEDispatch() if impl == "fused" else ReferenceMoEDispatch()
