"""Turn logical axes into MindSpore shard strategies, and apply every cell's ``shard`` method.

A Cell that can be sharded defines ``shard(self, sharder)`` and calls ``sharder.shard(primitive, name, axes...)``
for each primitive; the sharder maps axes through :data:`AXIS_RULES`, records the resulting strategy under the
cell's path (so tests compare tables as plain data) and calls ``primitive.shard``. In stand-alone mode MindSpore
accepts and ignores these annotations.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

from mindspore import nn

from .axes import AXIS_RULES

Axes = Sequence[Optional[str]]


class Sharder:
    """Maps logical axes to strategies for one parallel layout; records what it applied."""

    def __init__(self, parallel_cfg, rules: Optional[Dict[str, Optional[str]]] = None):
        self.cfg = parallel_cfg
        self.rules = dict(AXIS_RULES if rules is None else rules)
        if parallel_cfg is not None and not parallel_cfg.vocab_parallel:
            self.rules["vocab"] = None
        self.degrees = {
            "dp": getattr(parallel_cfg, "data_parallel", 1),
            "mp": getattr(parallel_cfg, "model_parallel", 1),
            "ep": getattr(parallel_cfg, "expert_parallel", 1),
        }
        self.records: Dict[str, Tuple[Tuple[int, ...], ...]] = {}
        self.prefix = ""

    def degree(self, axis: Optional[str]) -> int:
        """Split count of one logical axis (1 when replicated)."""
        if axis is None:
            return 1
        if axis not in self.rules:
            raise ValueError(f"unknown logical axis '{axis}'; known: {sorted(self.rules)}")
        dim = self.rules[axis]
        return 1 if dim is None else self.degrees[dim]

    def spec(self, axes: Axes) -> Tuple[int, ...]:
        """Strategy of one tensor from its logical axes, e.g. ('batch', 'embed') -> (dp, 1)."""
        return tuple(self.degree(a) for a in axes)

    def strategy(self, *tensors: Axes) -> Tuple[Tuple[int, ...], ...]:
        return tuple(self.spec(t) for t in tensors)

    def shard(self, primitive, name: str, *tensors: Axes):
        """Shard ``primitive`` by the logical axes of each of its inputs and record it as ``<cell path>.<name>``."""
        strategy = self.strategy(*tensors)
        self.records[f"{self.prefix}.{name}" if self.prefix else name] = strategy
        primitive.shard(strategy)
        return strategy


def has_shard(cell) -> bool:
    """True if ``cell`` defines its own ms_llm ``shard(sharder)`` method."""
    return getattr(type(cell), "shard", None) is not getattr(nn.Cell, "shard", None) and hasattr(cell, "shard")


def apply(model: nn.Cell, sharder: Sharder) -> Dict[str, Tuple[Tuple[int, ...], ...]]:
    """Call ``shard(sharder)`` on every sub-cell that defines it; return the strategy table (path -> strategy)."""
    for name, cell in model.cells_and_names():
        if has_shard(cell):
            sharder.prefix = name
            cell.shard(sharder)
    sharder.prefix = ""
    return dict(sharder.records)


def parameter_axes(model: nn.Cell) -> Dict[str, Tuple[Optional[str], ...]]:
    """Parameter name -> logical axes, from every cell that defines ``param_axes()`` (attribute -> axes).

    Parameters of cells without ``param_axes`` (fixed tables, statistics) are left out: they are replicated.
    """
    out: Dict[str, Tuple[Optional[str], ...]] = {}
    for _, cell in model.cells_and_names():
        if not callable(getattr(cell, "param_axes", None)):
            continue
        for attr, axes in cell.param_axes().items():
            param = getattr(cell, attr)
            if len(axes) != len(param.shape):
                raise ValueError(f"{type(cell).__name__}.param_axes: {attr} has shape {tuple(param.shape)} but "
                                 f"axes {axes}")
            out[param.name] = tuple(axes)
    return out
