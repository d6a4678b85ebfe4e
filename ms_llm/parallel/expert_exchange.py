"""All-to-all token exchange across an expert-parallel group, for MoE layers trained in data-parallel mode.

Each rank routes its own tokens into a buffer ``(E, C, H)`` over all ``E`` experts and holds the weights of
``E / ep`` of them. :class:`ExpertExchange` sends the expert blocks to their owners and receives the tokens every
member of its group routed to its own experts:

- dispatch: split the expert axis into ``ep`` blocks, send block ``j`` to member ``j``, concatenate what arrives
  along the capacity axis: ``(E, C, H) -> (E/ep, ep*C, H)``;
- combine: the inverse, ``(E/ep, ep*C, H) -> (E, C, H)``.

Two implementations with identical results:

- ``alltoall``: ``ops.AlltoAll`` over a communication group of the ``ep`` members (HCCL on Ascend);
- ``allgather``: MindSpore has no AlltoAll kernel on CPU, and CPU collectives only run on the world group, so
  every rank gathers every rank's send buffer (``AllGather`` over the world) and slices out the blocks its group
  members addressed to it.

The backward pass of an all-to-all is the inverse all-to-all of the output gradient (split and concat axes swapped);
the cell says so in its own ``bprop``, which also keeps the CPU stand-in differentiable (the automatic gradient of
``AllGather`` is a ReduceScatter, which has no CPU kernel either).
"""
from __future__ import annotations

from dataclasses import dataclass
from mindspore import nn, ops

IMPLS = ("alltoall", "allgather")


@dataclass(frozen=True)
class ExpertGroup:
    """Where this rank sits: expert-parallel groups are blocks of ``size`` consecutive ranks of the world."""
    size: int              # ep: members of the group
    rank: int              # this rank's index inside its group
    first: int             # world rank of the group's first member
    world_size: int        # ranks in the whole job
    name: str = ""         # communication group of the members (alltoall); "" = not created
    world_group: str = ""  # name of the world communication group (allgather stand-in)

    def __post_init__(self):
        if self.size < 1 or self.world_size % self.size:
            raise ValueError(f"expert-parallel group size {self.size} must divide the world size {self.world_size}")
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} is outside an expert-parallel group of {self.size}")
        if self.first % self.size or not 0 <= self.first < self.world_size:
            raise ValueError(f"group start {self.first} is not a multiple of the group size {self.size} "
                             f"inside the world [0, {self.world_size})")


def expert_group(world_rank: int, world_size: int, ep: int, name: str = "", world_group: str = "") -> ExpertGroup:
    """The expert-parallel group of ``world_rank`` when the world is cut into blocks of ``ep`` consecutive ranks."""
    if ep < 1 or world_size % ep:
        raise ValueError(f"parallel.expert_parallel={ep} must divide the number of processes {world_size}")
    return ExpertGroup(size=ep, rank=world_rank % ep, first=world_rank - world_rank % ep, world_size=world_size,
                       name=name, world_group=world_group)


def group_ranks(world_size: int, ep: int):
    """World ranks of every expert-parallel group: ``[[0..ep-1], [ep..2ep-1], ...]``."""
    if ep < 1 or world_size % ep:
        raise ValueError(f"parallel.expert_parallel={ep} must divide the number of processes {world_size}")
    return [list(range(g, g + ep)) for g in range(0, world_size, ep)]


def expert_data_ranks(world_size: int, ep: int):
    """World ranks holding the same experts, one list per position in an expert group: ``[[0, ep, ..], ..]``."""
    if ep < 1 or world_size % ep:
        raise ValueError(f"parallel.expert_parallel={ep} must divide the number of processes {world_size}")
    return [list(range(i, world_size, ep)) for i in range(ep)]


class ExpertExchange(nn.Cell):
    """All-to-all over an expert-parallel group.

    ``x`` is split along ``split_dim`` into ``group.size`` equal blocks; block ``j`` goes to member ``j``; the blocks
    received from members ``0..size-1`` are concatenated, in member order, along ``concat_dim``. The backward pass
    is the same exchange with the two axes swapped.
    """

    def __init__(self, group: ExpertGroup, split_dim: int, concat_dim: int, impl: str = "allgather"):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"unknown expert exchange '{impl}'; valid: {IMPLS}")
        if split_dim < 0 or concat_dim < 0:
            raise ValueError(f"split_dim/concat_dim must be non-negative axes, got {split_dim}, {concat_dim}")
        if impl == "alltoall" and group.size > 1 and not group.name:
            raise ValueError("the alltoall exchange needs a communication group name (ExpertGroup.name)")
        if impl == "allgather" and group.size > 1 and not group.world_group:
            raise ValueError("the allgather exchange needs the world communication group (ExpertGroup.world_group)")
        self.group = group
        self.n = group.size
        self.split_dim = split_dim
        self.concat_dim = concat_dim
        self.impl = impl
        if self.n > 1 and impl == "alltoall":
            self.forward_a2a = ops.AlltoAll(self.n, split_dim, concat_dim, group=group.name)
            self.backward_a2a = ops.AlltoAll(self.n, concat_dim, split_dim, group=group.name)
        if self.n > 1 and impl == "allgather":
            self.forward_gather = ops.AllGather(group=group.world_group)
            self.backward_gather = ops.AllGather(group=group.world_group)
        self.reshape = ops.Reshape()
        self.transpose = ops.Transpose()
        self.slice = ops.StridedSlice()

    def gathered_all_to_all(self, x, all_gather, sd, cd):
        """AlltoAll(split ``sd``, concat ``cd``) from AllGather + slicing (CPU): identical values, ``world/ep``
        times the traffic. Primitives only: this also runs inside ``bprop``."""
        n, r, first = self.n, self.group.rank, self.group.first
        shape = x.shape
        block = shape[sd] // n
        world = self.reshape(all_gather(x), (self.group.world_size,) + shape)  # (W, d0, d1, ...)
        begin = [first] + [0] * len(shape)
        end = [first + n] + list(shape)
        begin[sd + 1], end[sd + 1] = r * block, (r + 1) * block
        mine = self.slice(world, tuple(begin), tuple(end), (1,) * (len(shape) + 1))  # (n, .., d_sd/n, ..) for me
        # bring the sender axis next to concat_dim and merge it there (sender-major, like AlltoAll's gather phase)
        perm = tuple(range(1, cd + 1)) + (0,) + tuple(range(cd + 1, len(shape) + 1))
        mine = self.transpose(mine, perm)                                  # (..., n, d_cd, ...)
        out_shape = mine.shape[:cd] + (n * mine.shape[cd + 1],) + mine.shape[cd + 2:]
        return self.reshape(mine, out_shape)                               # (..., n*d_cd, ...)

    def construct(self, x):
        if self.n == 1:
            return x
        if self.impl == "alltoall":
            return self.forward_a2a(x)
        return self.gathered_all_to_all(x, self.forward_gather, self.split_dim, self.concat_dim)

    def bprop(self, x, out, dout):
        if self.n == 1:
            return (dout,)
        if self.impl == "alltoall":
            return (self.backward_a2a(dout),)
        return (self.gathered_all_to_all(dout, self.backward_gather, self.concat_dim, self.split_dim),)


def exchange_pair(group: ExpertGroup, impl: str):
    """(dispatch, combine) exchanges for expert buffers ``(E, C, H)``: dispatch (E, C, H) -> (E/ep, ep*C, H),
    combine (E/ep, ep*C, H) -> (E, C, H); each is the other's inverse."""
    return (ExpertExchange(group, split_dim=0, concat_dim=1, impl=impl),
            ExpertExchange(group, split_dim=1, concat_dim=0, impl=impl))


def resolve_impl(choice: str, device_target: str) -> str:
    """``parallel.expert_exchange`` -> implementation: 'auto' is AlltoAll on Ascend and the AllGather stand-in on
    CPU (which has no AlltoAll kernel); an explicit 'alltoall' on CPU is refused up front."""
    if choice == "auto":
        return "alltoall" if device_target == "Ascend" else "allgather"
    if choice == "alltoall" and device_target == "CPU":
        raise ValueError("parallel.expert_exchange=alltoall: MindSpore has no AlltoAll kernel on CPU; "
                         "use 'allgather' or 'auto'")
    if choice not in IMPLS:
        raise ValueError(f"parallel.expert_exchange: unknown '{choice}'; valid: auto, {', '.join(IMPLS)}")
    return choice


class ExpertParallelExchange(nn.Cell):
    """The MoE dispatcher's exchange hook (:class:`ms_llm.moe.dispatcher.ExpertExchange` interface) across an
    expert-parallel group: ``to_experts`` (E, G, C, H) -> (E/ep, ep*G, C, H), the tokens every member routed to
    this rank's experts; ``from_experts`` (E/ep, ep*G, C, H) -> (E, G, C, H), the outputs back to their owners."""

    def __init__(self, group: ExpertGroup, impl: str):
        super().__init__()
        self.dispatch, self.combine = exchange_pair(group, impl)

    def to_experts(self, x):
        return self.dispatch(x)

    def from_experts(self, x):
        return self.combine(x)

    def construct(self, x):
        return self.to_experts(x)


def make_expert_parallel(model: nn.Cell, group: ExpertGroup, impl: str):
    """Turn every MoE layer of ``model`` expert-parallel for this rank; returns the names of the expert weights.

    Each :class:`~ms_llm.moe.experts.Experts` keeps only the ``E/ep`` experts this rank owns (block ``group.rank``
    of the expert axis, sliced in place so names stay), and each dispatcher exchanges tokens through
    :class:`ExpertParallelExchange`. Call after loading/broadcasting full weights and before compiling. Expert
    weights must then be averaged over the ranks holding the same experts, not the whole world (see
    :class:`ms_llm.parallel.data_parallel.GradReducer`).
    """
    import numpy as np
    from mindspore import Tensor
    from ..moe.dispatcher import Dispatcher
    from ..moe.experts import Experts

    names = []
    found = False
    for _, cell in model.cells_and_names():
        if isinstance(cell, Dispatcher):
            cell.exchange = ExpertParallelExchange(group, impl)
            found = True
        if isinstance(cell, Experts):
            e = cell.num_experts
            if e % group.size:
                raise ValueError(f"parallel.expert_parallel={group.size} does not divide the {e} experts")
            local = e // group.size
            lo = group.rank * local
            for p in cell.get_parameters(expand=False):
                if tuple(p.shape)[0] != e:
                    raise ValueError(f"expert weight {p.name} {tuple(p.shape)} has no leading expert axis of {e}")
                p.set_data(Tensor(np.ascontiguousarray(p.asnumpy()[lo:lo + local])), slice_shape=True)
                names.append(p.name)
            cell.num_experts = local
    if not found:
        raise ValueError(f"parallel.expert_parallel={group.size}: {type(model).__name__} has no MoE dispatcher")
    return names
