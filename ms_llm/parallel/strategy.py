"""Parallel strategy files (MindSpore's ``ParallelStrategyMap`` protobuf) built from a model's logical axes.

MindSpore writes a strategy file when it compiles a semi-auto/auto-parallel graph (``strategy_ckpt_config``), which
needs Ascend. The same file can be derived from the model: each parameter's logical axes (``param_axes()`` of its
cell) map through the axis table onto the device matrix, and each primitive's strategy comes from the sharding
table. Such a file describes how a checkpoint is sliced across ranks, so it is what the offline tools
(``transform_checkpoints``, ``merge_sliced_parameter``, ``load_distributed_checkpoint``) need, and what
:mod:`ms_llm.parallel.reshard` consumes. Device matrix of one pipeline stage, rank-major as MindSpore numbers
devices (last dimension fastest): ``(dp, mp)``, or ``(dp/ep, ep, mp)`` with expert parallelism.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import numpy as np

from .sharding import Sharder, apply, parameter_axes


def device_matrix(parallel_cfg) -> Tuple[Tuple[int, ...], Dict[str, int]]:
    """(device matrix of one stage, mesh dim -> tensor-map index counted from the right)."""
    dp, mp, ep = parallel_cfg.data_parallel, parallel_cfg.model_parallel, parallel_cfg.expert_parallel
    if ep > 1:
        return (dp // ep, ep, mp), {"mp": 0, "ep": 1}
    return (dp, mp), {"mp": 0}


def tensor_map(name: str, shape, axes, sharder: Sharder, index: Dict[str, int]) -> Tuple[int, ...]:
    """Tensor map of one parameter: per dimension the device-matrix index splitting it, or -1."""
    out = []
    for dim, axis in zip(shape, axes):
        degree = sharder.degree(axis)
        if degree == 1:
            out.append(-1)
            continue
        mesh = sharder.rules[axis]
        if mesh not in index:
            raise ValueError(f"parameter {name}: axis '{axis}' maps to mesh dim '{mesh}', which does not split "
                             f"weights")
        if dim % degree:
            raise ValueError(f"parameter {name}: dimension {dim} on axis '{axis}' is not divisible by its "
                             f"{mesh} degree {degree}")
        out.append(index[mesh])
    return tuple(out)


def parameter_layouts(model, parallel_cfg, rules: Optional[dict] = None
                      ) -> Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]]:
    """Parameter name -> (device matrix, tensor map) for every parameter of ``model`` (replicated when the cell
    names no axes); ``rules`` overrides the axis table like :class:`Sharder`'s."""
    sharder = Sharder(parallel_cfg, rules)
    dev, index = device_matrix(parallel_cfg)
    axes = parameter_axes(model)
    out = {}
    for p in model.get_parameters():
        shape = tuple(p.shape)
        out[p.name] = (dev, tensor_map(p.name, shape, axes.get(p.name, (None,) * len(shape)), sharder, index))
    return out


def build_strategy_map(layouts, op_strategies: Dict[str, tuple], stage: int = 0):
    """A ``ParallelStrategyMap`` protobuf message from parameter layouts and primitive strategies."""
    from mindspore.train.node_strategy_pb2 import ParallelStrategyMap
    if not op_strategies:
        raise ValueError("a strategy file needs at least one primitive strategy (apply the model's shard methods)")
    smap = ParallelStrategyMap()
    smap.current_stage = stage
    for node, strategy in op_strategies.items():
        item = smap.parallel_strategy_item.add()
        item.node_name = node
        item.parallel_strategys.stage = stage
        for dims in strategy:
            item.parallel_strategys.parallel_strategy.add().dim.extend(int(d) for d in dims)
    for name, (dev, tmap) in layouts.items():
        item = smap.parallel_layout_item.add()
        item.param_name = name
        lay = item.parallel_layouts
        lay.dev_matrix.add().dim.extend(int(d) for d in dev)
        lay.tensor_map.add().dim.extend(int(t) for t in tmap)
        lay.param_split_shape.add()
        lay.indices_offset.add()
        lay.field = 0
        lay.opt_weight_shard_step = 0
        lay.opt_weight_shard_size = 0
    return smap


def write_strategy_file(model, parallel_cfg, path: str, table: Optional[Dict[str, tuple]] = None,
                        rules: Optional[dict] = None) -> str:
    """Write the strategy file of ``model`` under ``parallel_cfg`` (one pipeline stage) to ``path`` atomically.

    ``table``: the model's sharding table; computed with :func:`ms_llm.parallel.sharding.apply` when omitted
    (which also annotates the primitives, harmless in stand-alone mode).
    """
    if parallel_cfg.pipeline_stages != 1:
        raise ValueError("write_strategy_file describes one pipeline stage; for pipeline_stages > 1 use the files "
                         "MindSpore writes per stage (merged with mindspore.parallel.merge_pipeline_strategys)")
    table = apply(model, Sharder(parallel_cfg, rules)) if table is None else table
    smap = build_strategy_map(parameter_layouts(model, parallel_cfg, rules), table)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(smap.SerializeToString())
    os.replace(tmp, path)
    return path


def strategy_device_num(path: str) -> int:
    """Ranks a strategy file describes (product of the device matrix times the pipeline stages)."""
    from mindspore.parallel import build_searched_strategy
    layouts = build_searched_strategy(path)
    if not layouts:
        raise ValueError(f"strategy file {path} holds no parameter layouts")
    stages = {int(k.split("-", 1)[0]) for k in layouts if "-" in k.split(".", 1)[0]} or {0}
    dev = list(next(iter(layouts.values())).dev_matrix[0].dim)
    return int(np.prod(dev)) * len(stages)


def save_strategy_beside(model, parallel_cfg, info, directory: str) -> str:
    """Put this run's strategy file in ``directory`` (beside its checkpoints) and return its path.

    After a semi-auto / auto-parallel compile MindSpore has written the authoritative file (``info.strategy_file``,
    set by :func:`ms_llm.parallel.context.setup`): it is copied. Otherwise (data parallel, stand-alone) the file is
    derived from the model's axes, which for these layouts says every weight is whole on every rank.
    """
    import shutil
    from .context import strategy_file_in
    os.makedirs(directory, exist_ok=True)
    path = strategy_file_in(directory)
    if info.strategy_file:
        if not os.path.isfile(info.strategy_file):
            raise FileNotFoundError(f"MindSpore has not written the strategy file {info.strategy_file} yet "
                                    f"(it does so when the train step compiles)")
        if os.path.abspath(info.strategy_file) != os.path.abspath(path):
            shutil.copyfile(info.strategy_file, path + ".tmp")
            os.replace(path + ".tmp", path)
        return path
    return write_strategy_file(model, parallel_cfg, path)
