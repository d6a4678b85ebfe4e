"""Activation recomputation (``parallel.recompute``).

- ``full``: every residual block is recomputed in the backward pass; only block inputs stay in memory.
- ``selective`` (Korthikanti et al. 2022): only the attention core, softmax(q k^T) v, is recomputed: its
  ``(B, nh, S, S)`` scores and probabilities are the largest activations and the cheapest to recompute, while the
  core's inputs and output (q, k, v, context) stay stored.

Uses MindSpore's ``Cell.recompute()``; a cell can be configured once, so call this once per model.
"""
from __future__ import annotations

from typing import List

from mindspore import nn

MODES = ("none", "selective", "full")


def recompute_targets(model: nn.Cell, mode: str) -> List[str]:
    """Names of the cells ``mode`` recomputes."""
    from ..layers.attention import Attention
    from ..layers.block import TransformerBlock
    if mode not in MODES:
        raise ValueError(f"parallel.recompute: unknown mode '{mode}'; valid: {MODES}")
    if mode == "none":
        return []
    if mode == "full":
        names = [n for n, c in model.cells_and_names() if isinstance(c, TransformerBlock)]
    else:
        names = [f"{n}.core" if n else "core" for n, c in model.cells_and_names() if isinstance(c, Attention)]
    if not names:
        raise ValueError(f"parallel.recompute={mode}: {type(model).__name__} has no "
                         f"{'TransformerBlock' if mode == 'full' else 'Attention'} cells to recompute")
    return names


def apply_recompute(model: nn.Cell, mode: str) -> List[str]:
    """Mark the cells of ``mode`` for recomputation; returns their names."""
    names = recompute_targets(model, mode)
    cells = dict(model.cells_and_names())
    for name in names:
        cells[name].recompute()
    return names


def is_recomputed(cell: nn.Cell) -> bool:
    """Whether ``cell`` (or an ancestor, which configures its children) was marked for recomputation."""
    return bool(getattr(cell, "_has_config_recompute", False))
