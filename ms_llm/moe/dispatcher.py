"""Tokens -> expert slots and back, by indices on static shapes.

``dispatch``: hidden states (G, T, H) and ``slot_token`` (G, E, C) -> expert inputs (E, G*C, H), one batched
gather.
``combine``: expert outputs (E, G*C, H), ``slot_token`` and ``slot_weight`` (G, E, C) -> (G, T, H), one scatter-add
(tokens dropped by every expert get 0, so only the residual carries them; empty slots have weight 0).

Between the two, :class:`ExpertExchange` is the place for the cross-device exchange of expert parallelism
(``ms_llm/parallel/expert_exchange.py`` substitutes it: AlltoAll over the expert axis on Ascend, an AllGather
stand-in on CPU). It is the identity here, where one device holds every expert.

Why indices and not the GShard one-hot einsum: the einsum costs O(G*T*E*C*H) multiply-adds and an (G, T, E, C)
mask, the gather/scatter O(G*E*C*H) copies; ``bench/bench_moe.py`` measures both (see bench/results/moe.json).
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops


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

    The group axis stays explicit: a batched gather gives (G, E, C, H) and a transpose makes it expert-major, which
    is where semi-auto parallelism turns (batch)-sharding into (expert)-sharding (the transposes' strategies in
    :meth:`shard`). A flat variant (one gather of expert-major flat token indices, no activation transposes) timed
    the same for the whole layer forward + backward (within 2% at 4096 tokens x 512, 8 and 64 experts, on this CPU)
    but hides the group axis from the sharding plan.
    """

    def __init__(self, exchange: nn.Cell | None = None):
        super().__init__()
        self.exchange = exchange if exchange is not None else ExpertExchange()
        self.gather = ops.Gather(batch_dims=1)
        self.to_expert_major = ops.Transpose()
        self.to_group_major = ops.Transpose()

    def dispatch(self, x, slot_token):
        """x (G, T, H), slot_token (G, E, C) int32 -> (E_local, G'*C, H) (all E and G without an exchange)."""
        g, e, c = slot_token.shape
        h = x.shape[-1]
        slots = self.gather(x, ops.reshape(slot_token, (g, e * c)), 1)          # (G, E*C, H)
        slots = ops.reshape(slots, (g, e, c, h))                                 # (G, E, C, H)
        slots = self.to_expert_major(slots, (1, 0, 2, 3))                        # (E, G, C, H)
        slots = self.exchange.to_experts(slots)                                  # (E_local, G', C, H)
        return ops.reshape(slots, (slots.shape[0], -1, h))                       # (E_local, G'*C, H)

    def combine(self, y, slot_token, slot_weight, tokens: int):
        """y (E_local, G'*C, H) expert outputs, slot_token/slot_weight (G, E, C) -> (G, T, H), T = ``tokens``."""
        g, e, c = slot_token.shape
        h = y.shape[-1]
        y = ops.reshape(y, (y.shape[0], -1, c, h))                               # (E_local, G', C, H)
        y = self.exchange.from_experts(y)                                        # (E, G, C, H)
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
