"""Data-parallel pieces of a training step: identical initial weights, and gradients averaged across ranks.

In ``data_parallel`` mode MindSpore inserts no gradient communication into a hand-written training step, so the
step calls :class:`GradReducer` (on a gradient tuple) or :class:`BufferReducer` (in place on accumulated gradient
buffers, once per optimizer step after all micro-batches). Shared weights are averaged over the world (AllReduce
sum / world, the only AllReduce op MindSpore has on CPU); with expert parallelism each rank holds other experts, so
expert weights are averaged only over the ranks holding the same experts (the expert-data-parallel group). In
semi-auto / auto parallel MindSpore inserts the reductions itself and neither cell is needed.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from mindspore import Tensor, nn, ops


def needs_grad_reduction(info) -> bool:
    """True when the training step must average gradients itself (data_parallel mode with several ranks)."""
    return info.mode == "data_parallel" and info.world_size > 1


class GradReducer(nn.Cell):
    """``construct(grads) -> grads`` averaged over data-parallel ranks; ``params`` are the gradients' parameters
    in the same order, ``expert_params`` the names of the (expert-parallel) expert weights among them."""

    def __init__(self, params: Sequence, info, expert_params: Iterable[str] = ()):
        super().__init__(auto_prefix=False)
        from mindspore.communication import GlobalComm
        expert_params = set(expert_params)
        self.is_expert = tuple(p.name in expert_params for p in params)
        unknown = expert_params - {p.name for p in params}
        if unknown:
            raise ValueError(f"expert weights not among the reduced parameters: {sorted(unknown)}")
        self.world_mean = 1.0 / info.world_size
        self.world_reduce = ops.AllReduce(group=GlobalComm.WORLD_COMM_GROUP)
        self.expert_ranks = info.world_size // info.expert_parallel if any(self.is_expert) else 1
        if self.expert_ranks > 1:
            if not info.expert_data_group:
                raise ValueError("expert weights need the expert-data-parallel group that parallel.context.setup "
                                 "creates (data_parallel mode with expert_parallel > 1)")
            self.expert_reduce = ops.AllReduce(group=info.expert_data_group)
        self.expert_mean = 1.0 / self.expert_ranks

    def construct(self, grads):
        out = ()
        for i in range(len(grads)):
            if not self.is_expert[i]:
                out = out + (self.world_reduce(grads[i]) * self.world_mean,)
            elif self.expert_ranks > 1:
                out = out + (self.expert_reduce(grads[i]) * self.expert_mean,)
            else:
                out = out + (grads[i],)
        return out


class BufferReducer(nn.Cell):
    """``construct()``: every gradient buffer (a Parameter, e.g. the trainer's accumulation buffers) is replaced by
    its average over data-parallel ranks. ``params`` are the model weights the buffers belong to, same order."""

    def __init__(self, buffers, params: Sequence, info, expert_params: Iterable[str] = ()):
        super().__init__(auto_prefix=False)
        if len(buffers) != len(params):
            raise ValueError(f"{len(buffers)} gradient buffers for {len(params)} parameters")
        self.buffers = buffers
        self.reducer = GradReducer(params, info, expert_params)

    def construct(self):
        reduced = self.reducer(tuple(self.buffers))
        for i in range(len(self.buffers)):
            ops.assign(self.buffers[i], reduced[i])
        return reduced[0].sum()


class _Broadcast(nn.Cell):
    def __init__(self, group: str):
        super().__init__()
        self.broadcast = ops.Broadcast(0, group=group)

    def construct(self, *tensors):
        return self.broadcast(tensors)


def broadcast_parameters(cell: nn.Cell, info) -> int:
    """Copy rank 0's values of every parameter of ``cell`` to all ranks (identical initial weights however each
    process initialised them). Returns the number of parameters sent; a no-op for a single process."""
    if info.world_size == 1:
        return 0
    from mindspore.communication import GlobalComm
    params = list(cell.get_parameters())
    values = _Broadcast(GlobalComm.WORLD_COMM_GROUP)(*[Tensor(p.asnumpy()) for p in params])
    for p, v in zip(params, values):
        p.set_data(Tensor(np.array(v.asnumpy(), copy=True).reshape(tuple(p.shape))))
    return len(params)
