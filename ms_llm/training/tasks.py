"""data.task -> builder of a :class:`~ms_llm.training.task.Task` (module path, function), imported lazily."""
from __future__ import annotations

import importlib

TASKS = {
    "reverse": ("ms_llm.training.seq2seq_task", "build_seq2seq_task"),
    "sort": ("ms_llm.training.seq2seq_task", "build_seq2seq_task"),
    "copy": ("ms_llm.training.seq2seq_task", "build_seq2seq_task"),
    "causal_lm": ("ms_llm.data.causal_lm", "build_causal_lm_task"),
    "span_corruption": ("ms_llm.data.span_corruption", "build_span_corruption_task"),
    "mlm": ("ms_llm.data.bert", "build_mlm_task"),
    "classification": ("ms_llm.data.bert", "build_classification_task"),
}


def build_task(cfg):
    name = cfg.data.task
    if name not in TASKS:
        raise ValueError(f"data.task '{name}' has no trainer task yet; available: {sorted(TASKS)}")
    module, fn = TASKS[name]
    return getattr(importlib.import_module(module), fn)(cfg)
