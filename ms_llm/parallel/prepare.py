"""Everything a training run does to a model between building it and compiling the train step, in one call.

``prepare(model, loss_net, parallel_cfg, info)`` (``info`` from :func:`ms_llm.parallel.context.setup`):

1. semi-auto / auto (sharding propagation) parallel: every cell's ``shard`` strategies from the axis table;
2. ``parallel.recompute``: full blocks or the attention cores;
3. data parallel: rank 0's weights broadcast to every rank; with ``expert_parallel > 1`` each rank then keeps its
   experts and the MoE dispatchers exchange tokens across the expert group;
4. ``pipeline_stages > 1``: cells placed on balanced stages and the loss cell wrapped for micro-batches.

The trainer then builds its step on ``prepared.loss_net`` and, when :func:`grad_reducer` returns a cell, calls it
after accumulating each optimizer step's gradients and before applying them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from mindspore import nn


@dataclass
class Prepared:
    loss_net: nn.Cell                                    # the loss cell to differentiate (pipeline-wrapped if pp > 1)
    table: Dict[str, tuple] = field(default_factory=dict)       # sharding table applied (semi-auto / auto)
    stage_plan: Dict[str, int] = field(default_factory=dict)    # cell name -> pipeline stage
    recomputed: List[str] = field(default_factory=list)         # cells marked for recomputation
    expert_params: List[str] = field(default_factory=list)      # expert-parallel weights (data-parallel EP)


def shards_cells(parallel_cfg) -> bool:
    """Whether the cells' own strategies are used: semi-auto, or auto with sharding propagation (the other
    searches choose every strategy themselves)."""
    return parallel_cfg.mode == "semi_auto_parallel" or (
        parallel_cfg.mode == "auto_parallel" and parallel_cfg.search_mode == "sharding_propagation")


def prepare(model: nn.Cell, loss_net: nn.Cell, parallel_cfg, info) -> Prepared:
    from .data_parallel import broadcast_parameters
    from .expert_exchange import make_expert_parallel
    from .pipeline import pipeline_model
    from .recompute import apply_recompute
    from .sharding import Sharder, apply

    out = Prepared(loss_net=loss_net)
    if shards_cells(parallel_cfg):
        out.table = apply(model, Sharder(parallel_cfg))
    out.recomputed = apply_recompute(model, parallel_cfg.recompute)
    if info.mode == "data_parallel" and info.world_size > 1:
        broadcast_parameters(model, info)
        if info.expert_group is not None:
            out.expert_params = make_expert_parallel(model, info.expert_group, info.expert_exchange)
    out.loss_net, out.stage_plan = pipeline_model(model, loss_net, parallel_cfg)
    return out


def grad_reducer(buffers, params, info, prepared: Prepared) -> Optional[nn.Cell]:
    """The in-place gradient averaging cell the train step needs (data parallel, several ranks), else None."""
    from .data_parallel import BufferReducer, needs_grad_reduction
    if not needs_grad_reduction(info):
        return None
    return BufferReducer(buffers, params, info, prepared.expert_params)
