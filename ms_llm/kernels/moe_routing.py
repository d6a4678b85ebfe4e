"""Token-choice MoE routing (top-k, GShard capacity positions, expert slot tables): a reference composite and a
fused op, same signature.

Both cells are built as ``cell = make_moe_routing(impl, num_experts, top_k, normalize=False)`` (``impl`` 'auto' =
'fused' on CPU, 'reference' elsewhere: :func:`resolve_moe_routing_impl`) and called as
``cell(probs, capacity)`` with ``probs (G, T, E) float32`` (router softmax of G routing groups of T tokens over E
experts) and a Python int ``capacity`` (slots per expert and group, >= 1). They return a tuple
(the :data:`MOE_ROUTING_FIELDS`):

- ``expert_index (G, T, k) int32``: each token's k most probable experts, most probable first;
- ``gates (G, T, k) float32``: ``probs`` at those experts, divided by their sum over k when ``normalize``
  (GShard/GLaM top-2), before capacity; differentiable w.r.t. ``probs``;
- ``position (G, T, k) int32``: the slot of each choice inside its expert in GShard order (all first choices of
  the group in token order, then all second choices, ...), counting every earlier request, kept or not;
- ``kept (G, T, k) float32``: 1.0 iff ``position < capacity``, else 0.0 (a dropped choice);
- ``slot_token (G, E, C) int32``: the token (inside its group) in each slot, 0 in an empty slot;
- ``slot_weight (G, E, C) float32``: the gate of the slot's (token, choice), 0 in an empty slot; differentiable.

Only ``gates`` and ``slot_weight`` carry gradients (to ``probs``); the integer routing and ``kept`` are constants
for autodiff, as in the composite (:func:`ms_llm.moe.router.assign_positions` stops their gradients).

* :class:`ReferenceMoERouting` is the composite of :mod:`ms_llm.moe.router`: ``ops.topk``, the one-hot cumulative
  sum of :func:`~ms_llm.moe.router.assign_positions` and the ``scatter_nd`` of
  :func:`~ms_llm.moe.router.choices_to_slots`.
* :class:`FusedMoERouting` computes the integer routing in one call: on CPU the C++ kernel ``MoeRouteTopK`` of
  ``csrc/moe_routing.cc`` (``ops.Custom(func_type="aot")``, compiled with g++ on first construction, see
  :mod:`ms_llm.kernels._build`) returns expert_index, position, kept, slot_token and ``slot_choice`` (the flat
  choice ``t * k + j`` of each slot, ``T * k`` when empty) from one read of ``probs``; the differentiable outputs
  are then ordinary ops on ``probs``: ``gates = gather_elements(probs, expert_index)`` (normalised) and
  ``slot_weight = gather([gates | 0], slot_choice)``, so MindSpore's autodiff gives the same gradients as the
  composite with no custom bprop. On Ascend it uses MindSpore's built-in ``ops.topk`` and
  ``ops.moe_init_routing_v2`` (drop/pad mode) instead where CANN ships that op (Atlas A2/A3, SoC ``ascend910b`` /
  ``ascend910_93``), and the composite on the first-generation 910 (``ascend910``, which MoeInitRoutingV2 does
  not support); see :func:`select_backend`, :class:`_AscendMoERouting` and ``ascend_kernels/moe_routing/README.md``
  for the mapping and its one difference (positions of dropped choices). No custom Ascend binary is involved.

Ties: the CPU kernel ranks equal probabilities by expert index (lower first). ``ops.topk`` on CPU leaves the order
of equal values unspecified (measured: neither index order nor its reverse), so the two implementations agree
exactly whenever a token's probabilities have no ties at the k-th boundary, which is the case for router softmax
outputs of real-valued logits except on a measure-zero set.
"""

from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops
from mindspore import dtype as mstype

from ..moe.router import assign_positions, choices_to_slots
from ._build import build_library
from ._device import resolve_auto

__all__ = ["MOE_ROUTING_IMPLS", "MOE_ROUTING_FIELDS", "ReferenceMoERouting", "FusedMoERouting", "make_moe_routing",
           "resolve_moe_routing_impl", "select_backend"]

MOE_ROUTING_IMPLS = ("reference", "fused")
MOE_ROUTING_FIELDS = ("expert_index", "gates", "position", "kept", "slot_token", "slot_weight")
_MAX_TOP_K = 64          # the CPU kernel keeps the top-k list on the stack
_MAX_EXACT_CHOICES = 1 << 24  # the Ascend path carries choice ids in float32


# SoCs (MSContext.get_ascend_soc_version()) whose CANN ships MoeInitRoutingV2: Atlas A2 (910B) and A3 (910_93).
# Its documentation lists "Atlas training series" (the first-generation 910, soc 'ascend910') as unsupported.
ASCEND_MOE_INIT_ROUTING_SOCS = ("ascend910b", "ascend910_93")
BACKENDS = ("cpu_kernel", "ascend_moe_init_routing_v2", "reference")


def select_backend(device_target: str, soc_version: str = "") -> str:
    """What :class:`FusedMoERouting` runs on ``device_target``: ``cpu_kernel`` (the aot C++ kernel),
    ``ascend_moe_init_routing_v2`` (built-in Ascend ops) or ``reference`` (the composite, on an Ascend SoC without
    MoeInitRoutingV2). Any other device raises ValueError."""
    if device_target == "CPU":
        return "cpu_kernel"
    if device_target == "Ascend":
        return "ascend_moe_init_routing_v2" if soc_version in ASCEND_MOE_INIT_ROUTING_SOCS else "reference"
    raise ValueError(f"FusedMoERouting supports device_target 'CPU' or 'Ascend', got {device_target!r}; use "
                     f"make_moe_routing('reference', ...) there")


def _ascend_soc_version() -> str:
    from mindspore._c_expression import MSContext   # MindSpore's own query, as mindspore.train.model uses it
    return MSContext.get_instance().get_ascend_soc_version()


def _check_config(num_experts, top_k, normalize):
    for name, value in (("num_experts", num_experts), ("top_k", top_k)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"moe routing: {name} must be a positive int, got {value!r}")
    if top_k > num_experts:
        raise ValueError(f"moe routing: top_k={top_k} is greater than num_experts={num_experts}")
    if not isinstance(normalize, bool):
        raise ValueError(f"moe routing: normalize must be a bool, got {normalize!r}")


def _check_inputs(probs_shape, probs_dtype, num_experts, top_k, capacity):
    """ValueError naming the offending shape/dtype/value unless probs is (G, T, E) float32 and capacity >= 1."""
    if len(probs_shape) != 3:
        raise ValueError(f"moe routing expects probs of shape (G, T, E) = (groups, tokens, experts), got "
                         f"{probs_shape}")
    if probs_shape[2] != num_experts:
        raise ValueError(f"moe routing: probs {probs_shape} has {probs_shape[2]} experts on its last axis, the cell "
                         f"was built for num_experts={num_experts}")
    if top_k > probs_shape[2]:
        raise ValueError(f"moe routing: top_k={top_k} is greater than the {probs_shape[2]} experts of probs "
                         f"{probs_shape}")
    if probs_shape[0] < 1 or probs_shape[1] < 1:
        raise ValueError(f"moe routing: empty probs {probs_shape}")
    if probs_dtype != mstype.float32:
        raise ValueError(f"moe routing: probs must be float32, got {probs_dtype} for probs {probs_shape}")
    if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
        raise ValueError(f"moe routing: capacity must be an int >= 1, got {capacity!r}")


def _normalized(gates, normalize):
    if normalize:
        return gates / ops.sum(gates, -1, keepdim=True)                      # (G, T, k)
    return gates


class _MoERouting(nn.Cell):
    """The checked configuration both routing cells share."""

    def __init__(self, num_experts: int, top_k: int, normalize: bool = False):
        super().__init__()
        _check_config(num_experts, top_k, normalize)
        self.num_experts = num_experts
        self.k = top_k
        self.normalize = normalize


class ReferenceMoERouting(_MoERouting):
    """The composite routing of :mod:`ms_llm.moe.router` (topk, one-hot cumulative sum, scatter_nd)."""

    def construct(self, probs, capacity):
        _check_inputs(probs.shape, probs.dtype, self.num_experts, self.k, capacity)
        gates, expert_index = ops.topk(probs, self.k)                              # (G, T, k) float32, int32
        position, kept = assign_positions(expert_index, self.num_experts, capacity)   # (G, T, k) x 2
        gates = _normalized(gates, self.normalize)                                 # (G, T, k)
        slot_token, slot_weight = choices_to_slots(expert_index, position, kept, gates * kept, self.num_experts,
                                                   capacity)                       # (G, E, C) x 2
        return expert_index, gates, position, kept, slot_token, slot_weight


class _CpuMoERouting(nn.Cell):
    """The aot C++ kernel ``MoeRouteTopK``: probs (G, T, E), spec (k, C) -> the five integer/0-1 routing tables."""

    def __init__(self):
        super().__init__()
        lib = build_library("moe_routing.cc")
        self.route = ops.Custom(
            f"{lib}:MoeRouteTopK",
            out_shape=lambda p, s: ([p[0], p[1], s[0]], [p[0], p[1], s[0]], [p[0], p[1], s[0]],
                                    [p[0], p[2], s[1]], [p[0], p[2], s[1]]),
            out_dtype=lambda p, s: (mstype.int32, mstype.int32, mstype.float32, mstype.int32, mstype.int32),
            func_type="aot",
        )

    def construct(self, probs, spec):
        return self.route(probs, spec)


class _AscendMoERouting(nn.Cell):
    """Integer routing from MindSpore's built-in Ascend ops: ``ops.topk`` then ``ops.moe_init_routing_v2``.

    MoeInitRoutingV2 in drop/pad mode (``drop_pad_mode=1``) sorts the rows of ``expert_idx (R, 1)`` by expert,
    stably in row order, puts the first ``expert_capacity`` rows of each expert into ``expanded_x (experts, C, H)``
    (zeros in empty slots) and returns ``expanded_row_idx (R,)``: the destination ``expert * C + slot`` of every
    row, -1 when dropped. GShard order and groups are obtained by the row layout: one row per (group, choice,
    token), ``r = (g * k + j) * T + t``, with expert id ``g * E + e`` (``expert_num = G * E``), so each (group,
    expert) sees its requests first choices first, in token order. The row's payload ``x`` is ``t * k + j + 1`` in
    float32 (exact below 2^24 choices per group; 0 marks an empty slot), which gives slot_choice and slot_token.

    The one difference from the CPU kernel and the composite: MoeInitRoutingV2 does not report where a dropped
    request would have gone, so ``position`` of a dropped choice is ``capacity`` (kept choices are exact).
    Runs only on an Ascend device; tested by the ``@pytest.mark.ascend`` test of tests/kernels/test_moe_routing.py.
    """

    def __init__(self, top_k: int):
        super().__init__()
        self.k = top_k

    def construct(self, probs, spec):
        g, t, e = probs.shape
        k = self.k
        c = spec.shape[1]
        if g * t * k >= _MAX_EXACT_CHOICES:
            raise ValueError(f"moe routing on Ascend: {g * t * k} choices for probs {probs.shape} exceed the "
                             f"float32-exact range 2^24 of the MoeInitRoutingV2 payload")
        _, expert_index = ops.topk(probs, k)                                       # (G, T, k) int32
        offset = ops.reshape(ops.arange(g, dtype=mstype.int32), (g, 1, 1)) * e      # (G, 1, 1)
        rows = ops.transpose(expert_index + offset, (0, 2, 1))                     # (G, k, T) global expert id
        rows = ops.reshape(rows, (g * k * t, 1))                                   # (G*k*T, 1)
        choice = ops.reshape(ops.arange(t * k, dtype=mstype.int32), (1, t, k))     # (1, T, k) t*k + j
        payload = ops.transpose(ops.broadcast_to(choice, (g, t, k)), (0, 2, 1))    # (G, k, T)
        payload = ops.cast(ops.reshape(payload, (g * k * t, 1)) + 1, mstype.float32)   # (G*k*T, 1)
        expanded, dest, _, _ = ops.moe_init_routing_v2(payload, rows, 0, c, g * e, 1, 0, False)
        occupant = ops.cast(ops.reshape(expanded, (g, e, c)), mstype.int32)        # (G, E, C) choice + 1, 0 empty
        filled = occupant > 0                                                      # (G, E, C)
        slot_choice = ops.select(filled, occupant - 1, ops.full_like(occupant, t * k))   # (G, E, C)
        slot_token = ops.select(filled, ops.floor_divide(occupant - 1, k), ops.zeros_like(occupant))  # (G, E, C)
        dest = ops.transpose(ops.reshape(dest, (g, k, t)), (0, 2, 1))              # (G, T, k)
        kept_mask = dest >= 0                                                      # (G, T, k)
        position = ops.select(kept_mask, ops.floor_mod(dest, c), ops.full_like(dest, c))   # (G, T, k)
        kept = ops.cast(kept_mask, mstype.float32)                                 # (G, T, k)
        return expert_index, position, kept, slot_token, slot_choice


class FusedMoERouting(_MoERouting):
    """The integer routing in one op (C++ aot kernel on CPU, ``ops.moe_init_routing_v2`` on Ascend A2/A3), the
    differentiable gates and slot weights gathered from ``probs``; same contract as :class:`ReferenceMoERouting`.
    The device (and Ascend SoC) is read when the cell is constructed; ``self.backend`` says what runs
    (:func:`select_backend`)."""

    def __init__(self, num_experts: int, top_k: int, normalize: bool = False):
        super().__init__(num_experts, top_k, normalize)
        if top_k > _MAX_TOP_K:
            raise ValueError(f"moe routing: top_k={top_k} is above the supported maximum {_MAX_TOP_K}")
        device = ms.get_context("device_target")
        self.backend = select_backend(device, _ascend_soc_version() if device == "Ascend" else "")
        if self.backend == "cpu_kernel":
            self.impl = _CpuMoERouting()
        elif self.backend == "ascend_moe_init_routing_v2":
            self.impl = _AscendMoERouting(top_k)
        else:
            self.impl = ReferenceMoERouting(num_experts, top_k, normalize)
        self.use_reference = self.backend == "reference"
        self.gather = ops.Gather(batch_dims=1)

    def construct(self, probs, capacity):
        _check_inputs(probs.shape, probs.dtype, self.num_experts, self.k, capacity)
        if self.use_reference:
            return self.impl(probs, capacity)
        g, t, e = probs.shape
        k = self.k
        spec = ops.zeros((k, capacity), mstype.int32)                              # (k, C): shape only
        expert_index, position, kept, slot_token, slot_choice = self.impl(ops.stop_gradient(probs), spec)
        gates = _normalized(ops.gather_elements(probs, 2, expert_index), self.normalize)   # (G, T, k)
        padded = ops.concat((ops.reshape(gates, (g, t * k)), ops.zeros((g, 1), mstype.float32)), 1)  # (G, T*k+1)
        slot_weight = self.gather(padded, ops.reshape(slot_choice, (g, e * capacity)), 1)   # (G, E*C)
        slot_weight = ops.reshape(slot_weight, (g, e, capacity))                   # (G, E, C)
        return expert_index, gates, position, kept, slot_token, slot_weight


def resolve_moe_routing_impl(impl: str) -> str:
    """'auto' -> 'fused' on CPU (the C++ kernel), 'reference' elsewhere (the composite is what semi-auto parallelism
    shards, and Ascend's MoeInitRoutingV2 places dropped choices differently); 'reference' and 'fused' unchanged."""
    return resolve_auto(impl, MOE_ROUTING_IMPLS, "moe routing")


def make_moe_routing(impl: str, num_experts: int, top_k: int, normalize: bool = False) -> nn.Cell:
    """The routing cell named by ``impl`` ('auto', 'reference' or 'fused')."""
    impl = resolve_moe_routing_impl(impl)
    return (FusedMoERouting if impl == "fused" else ReferenceMoERouting)(num_experts, top_k, normalize)
