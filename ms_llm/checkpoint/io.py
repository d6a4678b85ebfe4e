"""Weight io shared by every converter and the trainer: safetensors, strict assignment, atomic writes.

A missing, unexpected or mis-shaped weight is a :class:`CheckpointMismatchError` listing every offender by name;
nothing is ever silently left at its random initialisation.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from typing import Dict, Iterable, Mapping, Optional

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor


class CheckpointMismatchError(ValueError):
    """Weights do not match the model; the message lists missing, unexpected and mis-shaped names."""

    def __init__(self, missing=(), unexpected=(), mismatched=(), source: str = ""):
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)
        lines = [f"checkpoint {source} does not match the model:" if source else "checkpoint does not match the model:"]
        if self.missing:
            lines.append(f"  missing ({len(self.missing)}): " + ", ".join(self.missing))
        if self.unexpected:
            lines.append(f"  unexpected ({len(self.unexpected)}): " + ", ".join(self.unexpected))
        if self.mismatched:
            lines.append(f"  mis-shaped ({len(self.mismatched)}): " + ", ".join(
                f"{n} file {fs} vs model {ms_}" for n, fs, ms_ in self.mismatched))
        super().__init__("\n".join(lines))


def load_safetensors(path: str) -> Dict[str, np.ndarray]:
    """All tensors of a safetensors file as numpy arrays (float16/bfloat16 upcast to float32 is the caller's)."""
    from safetensors.numpy import load_file
    if not os.path.exists(path):
        raise FileNotFoundError(f"no safetensors file at {path}")
    return load_file(path)


def save_safetensors(tensors: Mapping[str, np.ndarray], path: str, metadata: Optional[dict] = None) -> None:
    """Write a safetensors file atomically (temporary file in the same folder, then rename)."""
    from safetensors.numpy import save_file
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_", suffix=".safetensors")
    os.close(fd)
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def model_weights(cell) -> Dict[str, np.ndarray]:
    """path name -> numpy array of every Parameter of ``cell`` (frozen tables included)."""
    return {n: p.asnumpy() for n, p in named_parameters(cell).items()}


def named_parameters(cell) -> Dict[str, Parameter]:
    """Parameters by their path inside ``cell`` (independent of prefixes added by wrapper cells)."""
    return dict(cell.parameters_and_names())


def assign_weights(cell, weights: Mapping[str, np.ndarray], source: str = "", optional: Iterable[str] = (),
                   ignore: Iterable[str] = ()) -> None:
    """Set every parameter of ``cell`` from ``weights`` (name -> array), strictly.

    ``optional``: model parameter names that may be absent from ``weights`` (kept as initialised, with a warning
    naming them). ``ignore``: names in ``weights`` that are dropped without complaint. Everything else must match
    exactly in names and shapes, or a CheckpointMismatchError lists the differences.
    """
    params = named_parameters(cell)
    optional, ignore = set(optional), set(ignore)
    missing = [n for n in params if n not in weights and n not in optional]
    unexpected = [n for n in weights if n not in params and n not in ignore]
    mismatched = [(n, tuple(weights[n].shape), tuple(params[n].shape)) for n in params
                  if n in weights and tuple(weights[n].shape) != tuple(params[n].shape)]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(missing, unexpected, mismatched, source)
    absent = sorted(n for n in optional if n in params and n not in weights)
    if absent:
        warnings.warn(f"{source or 'checkpoint'}: not in the file, left at initialisation: {', '.join(absent)}",
                      stacklevel=2)
    for n, p in params.items():
        if n in weights:
            p.set_data(Tensor(np.asarray(weights[n]).astype(np_dtype(p.dtype))))


_NP_DTYPES = {ms.float32: np.float32, ms.float16: np.float16, ms.float64: np.float64, ms.int32: np.int32,
              ms.int64: np.int64, ms.bool_: np.bool_}


def np_dtype(ms_dtype):
    """numpy dtype of a MindSpore parameter dtype."""
    if ms_dtype not in _NP_DTYPES:
        raise TypeError(f"no numpy dtype for MindSpore dtype {ms_dtype}")
    return _NP_DTYPES[ms_dtype]


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_json(obj, path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)
