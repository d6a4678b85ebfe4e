"""The whole run: model + train + data + parallel, loaded strictly from YAML with `key.sub=value` overrides."""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Optional

import yaml

from .base import ConfigError, check, from_dict, suggest, to_dict
from .model import ModelConfig
from .parallel import ParallelConfig
from .train import DataConfig, TrainConfig


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)           # architecture
    train: TrainConfig = field(default_factory=TrainConfig)           # optimisation and logging
    data: DataConfig = field(default_factory=DataConfig)              # dataset / task
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # every parallel knob

    def __post_init__(self):
        m, p, t, d = self.model, self.parallel, self.train, self.data
        mp = p.model_parallel
        if mp > 1:
            check(m.num_heads % mp == 0, "parallel.model_parallel",
                  f"{mp} does not divide model.num_heads={m.num_heads}")
            check(m.kv_heads % mp == 0, "parallel.model_parallel",
                  f"{mp} does not divide the key/value heads ({m.kv_heads})")
            check(m.ffn_hidden_size % mp == 0, "parallel.model_parallel",
                  f"{mp} does not divide model.ffn_hidden_size={m.ffn_hidden_size}")
            if p.vocab_parallel:
                check(m.vocab_size % mp == 0, "parallel.model_parallel",
                      f"{mp} does not divide model.vocab_size={m.vocab_size} (pad the vocabulary or set "
                      f"parallel.vocab_parallel=false)")
        if p.pipeline_stages > 1:
            check(m.num_layers % p.pipeline_stages == 0 or m.num_layers >= p.pipeline_stages,
                  "parallel.pipeline_stages", f"{p.pipeline_stages} stages > model.num_layers={m.num_layers}")
            check(t.micro_batch_size % p.micro_batches == 0, "parallel.micro_batches",
                  f"{p.micro_batches} does not divide the micro-batch size {t.micro_batch_size}")
        if p.expert_parallel > 1:
            check(m.moe.num_experts > 0, "parallel.expert_parallel", "expert parallelism needs model.moe.num_experts > 0")
            check(m.moe.num_experts % p.expert_parallel == 0, "parallel.expert_parallel",
                  f"{p.expert_parallel} does not divide model.moe.num_experts={m.moe.num_experts}")
        if p.data_parallel > 1:
            check(t.micro_batch_size % p.data_parallel == 0, "parallel.data_parallel",
                  f"{p.data_parallel} does not divide the micro-batch size {t.micro_batch_size}")
        if d.task in ("reverse", "sort", "copy"):
            check(m.arch in ("transformer", "switch"), "data.task",
                  f"seq2seq task '{d.task}' needs an encoder-decoder arch, not '{m.arch}'")
        if d.task == "causal_lm":
            check(m.arch in ("gpt", "glam"), "data.task", f"causal_lm needs a decoder-only arch, not '{m.arch}'")
        if d.task in ("mlm",):
            check(m.arch == "bert", "data.task", f"mlm needs arch 'bert', not '{m.arch}'")
        if d.task == "span_corruption":
            check(m.arch in ("transformer", "switch"), "data.task",
                  f"span_corruption pre-trains an encoder-decoder arch (transformer, switch), not '{m.arch}'")
            from ..data.span_corruption import span_corruption_lengths
            n = span_corruption_lengths(d.seq_length, d.noise_density, d.mean_noise_span_length)
            widest = max(n.inputs_length, n.targets_length)
            check(widest <= m.max_position_embeddings or m.position_embedding in ("relative", "rotary", "none"),
                  "data.seq_length", f"{d.seq_length} corrupts into inputs of {n.inputs_length} and targets of "
                  f"{n.targets_length} tokens, more than model.max_position_embeddings={m.max_position_embeddings}")
            # byte-level BPE: 256 byte symbols + <|pad|>, <|bos|>, <|endoftext|>
            check(d.tokenizer is not None or m.vocab_size - d.num_sentinels >= 259, "model.vocab_size",
                  f"{m.vocab_size} - data.num_sentinels={d.num_sentinels} leaves {m.vocab_size - d.num_sentinels} "
                  f"ids for the byte-level BPE, which needs >= 259")
        check(d.task in ("reverse", "sort", "copy", "span_corruption") or d.seq_length <= m.max_position_embeddings
              or m.position_embedding in ("relative", "rotary", "none"), "data.seq_length", f"{d.seq_length} > model.max_position_embeddings={m.max_position_embeddings}")


def parse_value(text: str) -> Any:
    """A command-line override value, read as YAML (numbers, booleans, lists, null, strings)."""
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(data: Dict[str, Any], overrides: Iterable[str]) -> Dict[str, Any]:
    """Apply `a.b.c=value` strings to a nested dict; a malformed override is a ConfigError."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{key}': '{p}' is not a section")
        node[parts[-1]] = parse_value(value)
    return data


def load_config(path: Optional[str] = None, overrides: Iterable[str] = (), base: Optional[dict] = None) -> RunConfig:
    """Load a YAML run config strictly, apply overrides, validate everything before any graph is built."""
    data: Dict[str, Any] = copy.deepcopy(base) if base else {}
    if path is not None:
        if not os.path.exists(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        data.update(loaded)
    data = apply_overrides(data, overrides)
    sections = ("model", "train", "data", "parallel")
    for k in data:
        if k not in sections:
            raise ConfigError(f"unknown section '{k}'{suggest(k, sections)}; valid sections: {', '.join(sections)}")
    return from_dict(RunConfig, data)


def dump_config(cfg: RunConfig, path: str) -> None:
    """Write the resolved config as YAML (atomically)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    os.replace(tmp, path)
