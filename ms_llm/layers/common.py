"""Small shared pieces: dtypes, initialisers, dropout."""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn
from mindspore.common.initializer import Normal, initializer

from ..kernels.dropout import FusedDropout

DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}


def ms_dtype(name: str):
    """MindSpore dtype from its config name."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype '{name}'; valid: {sorted(DTYPES)}")
    return DTYPES[name]


def normal_param(shape, std: float, name: str) -> Parameter:
    """A float32 Parameter drawn from N(0, std^2) by MindSpore's initializer (reproducible under ms.set_seed)."""
    return Parameter(initializer(Normal(sigma=std), tuple(shape), ms.float32), name=name)


def const_param(shape, value: float, name: str) -> Parameter:
    return Parameter(Tensor(np.full(shape, value, dtype=np.float32)), name=name)


def dropout(p: float) -> nn.Cell:
    """Dropout with drop probability ``p``: the fused kernel cell on CPU (:mod:`ms_llm.kernels.dropout`; float32 inputs,
    MindSpore's Dropout for others), ``nn.Dropout`` elsewhere; the identity cell when p == 0."""
    if p == 0:
        return nn.Identity()
    if ms.get_context("device_target") == "CPU":
        return FusedDropout(p)
    return nn.Dropout(p=p)
