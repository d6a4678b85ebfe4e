"""What the trainer needs from a task: a model, a loss cell, resumable batches, evaluation, and FLOPs for MFU.

Each data task (``data.task`` in the config) has a builder ``build(cfg: RunConfig) -> Task`` listed in
:data:`ms_llm.training.tasks.TASKS`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Tuple

import numpy as np
from mindspore import nn


@dataclass
class Task:
    model: nn.Cell                     # the model whose parameters are trained and checkpointed
    loss_net: nn.Cell                  # construct(*batch) -> scalar float32 loss (aux losses already added)
    batches: Callable[[int], Iterator[Tuple[np.ndarray, ...]]]
    # batches(start_step) yields the global batch of every step from start_step on, in loss_net's input order
    # (numpy arrays, leading axis = train.batch_size); deterministic in (seed, step) so resume is exact.
    evaluate: Callable[[nn.Cell], Dict[str, float]]   # held-out metrics (e.g. exact_match, accuracy, perplexity)
    tokens_per_batch: int              # tokens processed per optimizer step (for tokens/s)
    flops_per_token: float             # training FLOPs per token (forward + backward), for MFU
    sample: Optional[Callable[[nn.Cell], str]] = None  # a human-readable sample printed at the end
    log_metrics: Optional[Callable[[nn.Cell, Tuple[np.ndarray, ...]], Dict[str, float]]] = None
    # extra metrics computed at log intervals on the current batch (e.g. MoE expert load, dropped-token fraction)
    initialized_from: Optional[str] = None  # set by builders that loaded train.init_from themselves (HF dirs)
