"""The expert-parallel exchange on one process: group arithmetic, the AllGather stand-in's slicing against a numpy
AlltoAll (with the world's AllGather emulated), and how a MoE layer is cut into its local experts.

The real exchange across processes (forward and gradients equal to the single-process MoE layer) is
tests/parallel/test_expert_parallel.py (msrun, marked distributed).
"""
import numpy as np
import pytest
from mindspore import Tensor, nn, ops

from ms_llm.config import ModelConfig, MoEConfig
from ms_llm.parallel.expert_exchange import (ExpertExchange, ExpertGroup, ExpertParallelExchange, expert_data_ranks,
                                             expert_group, group_ranks, make_expert_parallel, resolve_impl)


def test_groups():
    assert group_ranks(8, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert expert_data_ranks(8, 4) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    g = expert_group(6, 8, 4, world_group="w")
    assert (g.size, g.rank, g.first, g.world_size) == (4, 2, 4, 8)
    with pytest.raises(ValueError, match="expert_parallel=3 must divide the number of processes 8"):
        expert_group(0, 8, 3)
    with pytest.raises(ValueError, match="not a multiple of the group size"):
        ExpertGroup(size=2, rank=0, first=1, world_size=4)
    assert resolve_impl("auto", "CPU") == "allgather" and resolve_impl("auto", "Ascend") == "alltoall"
    with pytest.raises(ValueError, match="no AlltoAll kernel on CPU"):
        resolve_impl("alltoall", "CPU")
    with pytest.raises(ValueError, match="needs a communication group name"):
        ExpertExchange(expert_group(0, 4, 2), 0, 1, impl="alltoall")


class WorldGather(nn.Cell):
    """AllGather of a 4-rank world on one process: the other ranks' buffers are constants."""

    def __init__(self, buffers, me):
        super().__init__()
        self.buffers = [Tensor(b) for b in buffers]
        self.me = me

    def construct(self, x):
        parts = [x if i == self.me else self.buffers[i] for i in range(len(self.buffers))]
        return ops.concat(parts, 0)


def numpy_all_to_all(xs, first, n, me, split_dim, concat_dim):
    """What member ``me`` of the group [first, first+n) receives from an AlltoAll."""
    return np.concatenate([np.split(xs[s], n, axis=split_dim)[me] for s in range(first, first + n)], axis=concat_dim)


@pytest.mark.parametrize("ep,rank,split_dim,concat_dim", [(2, 3, 0, 1), (4, 1, 0, 1), (4, 2, 1, 0), (2, 0, 2, 0)])
def test_allgather_stand_in_equals_all_to_all(ep, rank, split_dim, concat_dim):
    rng = np.random.default_rng(rank)
    xs = [rng.normal(size=(4, 4, 4, 3)).astype(np.float32) for _ in range(4)]
    ex = ExpertExchange(expert_group(rank, 4, ep, world_group="mccl_world_group"), split_dim, concat_dim)
    ex.forward_gather = WorldGather(xs, rank)
    got = ex(Tensor(xs[rank])).asnumpy()
    want = numpy_all_to_all(xs, rank - rank % ep, ep, rank % ep, split_dim, concat_dim)
    np.testing.assert_array_equal(got, want)


def test_make_expert_parallel_keeps_this_ranks_experts():
    from ms_llm.moe.dispatcher import Dispatcher
    from ms_llm.moe.layer import MoELayer
    cfg = ModelConfig(arch="gpt", vocab_size=32, hidden_size=8, num_layers=1, num_heads=2, ffn_hidden_size=16,
                      moe=MoEConfig(num_experts=4, top_k=2))
    layer = MoELayer(cfg)
    full = {p.name: p.asnumpy() for p in layer.get_parameters()}
    names = make_expert_parallel(layer, expert_group(3, 4, 2, world_group="mccl_world_group"), "allgather")
    assert sorted(names) == ["experts.b_in", "experts.b_out", "experts.w_in", "experts.w_out"]
    for n in names:
        np.testing.assert_array_equal(getattr(layer.experts, n.split(".")[1]).asnumpy(), full[n][2:4])  # rank 1 of 2
    np.testing.assert_array_equal(layer.router.gate.weight.asnumpy(), full["router.gate.weight"])
    assert layer.experts.num_experts == 2
    assert isinstance(layer.dispatcher.exchange, ExpertParallelExchange)
    assert (layer.dispatcher.exchange.dispatch.split_dim, layer.dispatcher.exchange.dispatch.concat_dim) == (0, 1)
    assert (layer.dispatcher.exchange.combine.split_dim, layer.dispatcher.exchange.combine.concat_dim) == (1, 0)
    with pytest.raises(ValueError, match="does not divide the 4 experts"):
        make_expert_parallel(MoELayer(cfg), ExpertGroup(size=3, rank=0, first=0, world_size=3, world_group="w"),
                             "allgather")
    with pytest.raises(ValueError, match="has no MoE dispatcher"):
        make_expert_parallel(Dispatcher().exchange, expert_group(0, 2, 2, world_group="w"), "allgather")
