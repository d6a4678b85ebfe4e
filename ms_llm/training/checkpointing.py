"""Training checkpoints: model weights + optimizer/loss-scale state + step + config, written atomically.

Layout in ``<output_dir>/checkpoints/``: ``step_00000100.ckpt`` (MindSpore checkpoint; names ``model/<path>`` and
``state/<name>``), ``step_00000100.json`` (step, data position, sha256 of the .ckpt, config) and ``latest.json``
(the commit point: it is replaced only after both files are complete). Loading verifies the hash and that every
name and shape matches; a mismatch raises CheckpointMismatchError listing the offenders.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Dict, List, Optional

import numpy as np
import mindspore as ms
from mindspore import Tensor

from ..checkpoint.io import (CheckpointMismatchError, assign_weights, atomic_write_json, file_sha256,
                             named_parameters, np_dtype)
from ..config import dump_config, to_dict

FORMAT = "ms_llm-train-v1"


def checkpoint_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def save(output_dir: str, step: int, model, state_params, cfg, keep: int = 2) -> str:
    """Write checkpoint ``step`` atomically and return its path; keep the newest ``keep`` checkpoints."""
    d = checkpoint_dir(output_dir)
    os.makedirs(d, exist_ok=True)
    name = f"step_{step:08d}"
    entries = [{"name": f"model/{n}", "data": Tensor(p.asnumpy())} for n, p in named_parameters(model).items()]
    entries += [{"name": f"state/{p.name}", "data": Tensor(p.asnumpy())} for p in state_params]
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".tmp_{name}_", suffix=".ckpt")
    os.close(fd)
    try:
        ms.save_checkpoint(entries, tmp)
        final = os.path.join(d, name + ".ckpt")
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    meta = {"format": FORMAT, "step": step, "data_position": step, "file": name + ".ckpt",
            "sha256": file_sha256(final), "config": to_dict(cfg),
            "model_class": f"{type(model).__module__}:{type(model).__name__}"}
    atomic_write_json(meta, os.path.join(d, name + ".json"))
    dump_config(cfg, os.path.join(d, name + ".yaml"))
    atomic_write_json({"latest": name}, os.path.join(d, "latest.json"))
    _prune(d, keep)
    return final


def _prune(d: str, keep: int) -> None:
    steps = sorted(f[:-5] for f in os.listdir(d) if f.startswith("step_") and f.endswith(".json"))
    for name in steps[:-keep]:
        for ext in (".ckpt", ".json", ".yaml"):
            p = os.path.join(d, name + ext)
            if os.path.exists(p):
                os.remove(p)


def latest(output_dir: str) -> Optional[dict]:
    """Metadata of the newest complete checkpoint in ``output_dir`` (None if there is none)."""
    p = os.path.join(checkpoint_dir(output_dir), "latest.json")
    if not os.path.exists(p):
        return None
    with open(p) as f:
        name = json.load(f)["latest"]
    with open(os.path.join(checkpoint_dir(output_dir), name + ".json")) as f:
        meta = json.load(f)
    meta["path"] = os.path.join(checkpoint_dir(output_dir), meta["file"])
    return meta


def read(meta: dict) -> Dict[str, np.ndarray]:
    """Arrays of a checkpoint after verifying its hash."""
    path = meta["path"]
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown checkpoint format {meta.get('format')!r}")
    digest = file_sha256(path)
    if digest != meta["sha256"]:
        raise ValueError(f"{path}: sha256 {digest} does not match the recorded {meta['sha256']} (corrupt or replaced)")
    return {k: v.asnumpy() for k, v in ms.load_checkpoint(path).items()}


def load_model(meta: dict, model) -> None:
    arrays = read(meta)
    weights = {k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")}
    assign_weights(model, weights, source=meta["path"])


def load(meta: dict, model, state_params: List) -> int:
    """Restore model and training state strictly; returns the step to continue from."""
    arrays = read(meta)
    weights = {k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")}
    assign_weights(model, weights, source=meta["path"])
    state = {k[len("state/"):]: v for k, v in arrays.items() if k.startswith("state/")}
    names = {p.name: p for p in state_params}
    missing = [n for n in names if n not in state]
    unexpected = [n for n in state if n not in names]
    shaped = [(n, state[n].shape, tuple(names[n].shape)) for n in names if n in state
              and tuple(state[n].shape) != tuple(names[n].shape)]
    if missing or unexpected or shaped:
        raise CheckpointMismatchError(missing, unexpected, shaped, meta["path"] + " (optimizer state)")
    for n, p in names.items():
        p.set_data(Tensor(state[n].astype(np_dtype(p.dtype))))
    return int(meta["step"])
