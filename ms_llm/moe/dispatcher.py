"""Tokens -> expert slots and back, by indices on static shapes.

``dispatch``: hidden states (G, T, H) and ``slot_token`` (G, E, C) -> expert inputs (E, G*C, H): a gather of the
slots in expert-major order.
``combine``: expert outputs (E, G*C, H), ``slot_token`` and ``slot_weight`` (G, E, C) -> (G, T, H), a weighted
scatter-add (tokens dropped by every expert get 0, so only the residual carries them; empty slots have weight 0).
Both run in the cell ``moe.dispatch_impl`` names (:mod:`ms_llm.kernels.moe_dispatch`): MindSpore ops (Gather,
Transpose, UnsortedSegmentSum: what semi-auto parallelism shards) or one fused CPU kernel per direction.

Between the two, :class:`ExpertExchange` is the place for the cross-device exchange of expert parallelism
(``ms_llm/parallel/expert_exchange.py`` substitutes it: AlltoAll over the expert axis on Ascend, an AllGather
stand-in on CPU). It is the identity here, where one device holds every expert.

Why indices and not the GShard one-hot einsum: the einsum costs O(G*T*E*C*H) multiply-adds and an (G, T, E, C)
mask, the gather/scatter O(G*E*C*H) copies; ``bench/bench_moe.py`` measures both (see bench/results/moe_full.md).
"""
from __future__ import annotations

from mindspore import nn, ops

from ..kernels.moe_dispatch import make_moe_dispatch


class ExpertExchange(nn.Cell):
    """Hook between dispatch and experts: ``to_experts`` (E, G, C, H) -> what the local experts process, and
    ``from_experts`` back. Identity on one device."""

    def to_experts(self, x):
        return x

    def from_experts(self, x):
        return x

    def construct(self, x):
        return self.to_experts(x)


class Dispatcher(nn.Cell):
    """Gather tokens into expert slots and scatter-add the weighted expert outputs back.

    The group axis stays explicit: the slots are (E, G, C, H), which is where semi-auto parallelism turns
    (batch)-sharding into (expert)-sharding (the reference's transposes, see
    :meth:`ms_llm.kernels.moe_dispatch.ReferenceMoEDispatch.shard`), and the axis the exchange concatenates on.
    ``impl``: 'auto' (fused kernels on CPU, the reference elsewhere), 'fused' or 'reference'.
    """

    def __init__(self, exchange: nn.Cell | None = None, impl: str = "auto"):
        super().__init__()
        self.exchange = exchange if exchange is not None else ExpertExchange()
        self.slots = make_moe_dispatch(impl)

    def dispatch(self, x, slot_token):
        """x (G, T, H), slot_token (G, E, C) int32 -> (E_local, G'*C, H) (all E and G without an exchange)."""
        h = x.shape[-1]
        slots = self.slots.dispatch(x, slot_token)                               # (E, G, C, H)
        slots = self.exchange.to_experts(slots)                                  # (E_local, G', C, H)
        return ops.reshape(slots, (slots.shape[0], -1, h))                       # (E_local, G'*C, H)

    def combine(self, y, slot_token, slot_weight, tokens: int):
        """y (E_local, G'*C, H) expert outputs, slot_token/slot_weight (G, E, C) -> (G, T, H), T = ``tokens``."""
        c = slot_token.shape[2]
        h = y.shape[-1]
        y = ops.reshape(y, (y.shape[0], -1, c, h))                               # (E_local, G', C, H)
        y = self.exchange.from_experts(y)                                        # (E, G, C, H)
        return self.slots.combine(y, slot_token, slot_weight, tokens)            # (G, T, H)
