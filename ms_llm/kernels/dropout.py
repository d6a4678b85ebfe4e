"""Dropout with a fused CPU forward/backward, and MindSpore's ``nn.Dropout`` as its same-signature reference.

Both cells are built with ``p``, the drop probability in [0, 1), and called ``construct(x) -> y``. In training mode
(``set_train(True)``) every element of ``x`` is zeroed with probability ``p`` and the others are scaled by
``1 / (1 - p)`` (inverted dropout, Srivastava et al. 2014, as MindSpore and PyTorch do it); in eval mode ``y`` is
``x``. Gradients flow to ``x`` through the same mask and scale.

* :class:`ReferenceDropout`: ``nn.Dropout(p=p)``: MindSpore's CPU Dropout draws ~4 ns per element and keeps a
  float32 mask for the backward (88 ms + 19 ms of DropoutGrad in a BERT-base training step of ~2.5 s).
* :class:`FusedDropout`: on CPU, for float32 inputs, the C++ kernels ``DropoutFwd`` / ``DropoutBwd`` of
  ``csrc/dropout.cc`` through ``ops.Custom(func_type="aot")``, the backward wired as the bprop: one threaded,
  vectorised pass writes ``y`` and a 1-byte mask; the backward is ``dy * mask * scale`` ((1024, 768): 0.38 ms
  forward and 0.25 ms backward in the kernel, against ~3.4 ms + 0.7 ms for MindSpore's). Random bits are
  counter-based: call ``c`` of a cell hashes ``(seed, c)`` into a key and element ``i``'s bits are a hash of
  ``(i, key)`` (see the kernel source), so the masks do not depend on the threads. The seed comes from MindSpore's
  seeding (``mindspore.set_seed``: every new cell takes the next op seed, as MindSpore's random ops do; without a
  global seed a random one) and the call counter is per cell, so two models built after the same ``set_seed``
  draw the same masks. Other dtypes (float16 under mixed precision) and Ascend use the reference.

The forward primitive is marked ``recompute(False)``: under activation recomputation (``parallel.recompute``)
its output and mask are kept rather than re-drawn, so the recomputed forward and the backward use the forward's
mask.
"""

from __future__ import annotations

import itertools
import math
import os

import numpy as np
from mindspore import Tensor, nn, ops
from mindspore import dtype as mstype
from mindspore.common.seed import _get_graph_seed

from ._build import build_library
from ._device import kernel_device

__all__ = ["DROPOUT_IMPLS", "ReferenceDropout", "FusedDropout", "make_dropout"]

DROPOUT_IMPLS = ("reference", "fused")
_INSTANCES = itertools.count()       # each fused cell's number: the key of its call counter in the kernel library
_SEED_LIMIT = 2 ** 52                # seeds travel as float64: integers below 2^53 are exact


def _check_p(p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p must be a float in [0, 1); got {p!r}")
    return float(p)


def _check_seed(seed):
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < _SEED_LIMIT):
        raise ValueError(f"dropout: seed must be None or an int in [0, 2^52); got {seed!r}")
    return seed


def _op_seed() -> int:
    """The next op seed of MindSpore's seeding (``set_seed``), folded into [0, 2^52); random without a global seed."""
    seed0, seed1 = _get_graph_seed(None, "FusedDropout")
    if seed0 == 0 and seed1 == 0:
        return int.from_bytes(os.urandom(8), "little") % _SEED_LIMIT
    return (int(seed0) * 0x9E3779B97F4A7C15 + int(seed1) * 0xC2B2AE3D27D4EB4F) % _SEED_LIMIT


class ReferenceDropout(nn.Cell):
    """``nn.Dropout(p=p)``; see the module docstring."""

    def __init__(self, p: float):
        super().__init__()
        self.p = _check_p(p)
        self.drop = nn.Dropout(p=self.p) if self.p > 0 else nn.Identity()

    def construct(self, x):
        return self.drop(x)


class _CpuDropout(nn.Cell):
    """The aot C++ forward (y, mask) with the aot C++ backward as its bprop."""

    def __init__(self, p: float, seed: int):
        super().__init__()
        lib = build_library("dropout.cc")
        bwd = ops.Custom(f"{lib}:DropoutBwd", out_shape=lambda dy, m, prm: dy, out_dtype=lambda dy, m, prm: dy,
                         func_type="aot")

        def bprop(x, params, out, dout):
            return bwd(dout[0], out[1], params), ops.zeros_like(params)

        self.fwd = ops.Custom(f"{lib}:DropoutFwd", out_shape=lambda x, prm: (x, x),
                              out_dtype=lambda x, prm: (x, mstype.uint8), func_type="aot", bprop=bprop)
        self.fwd.recompute(False)
        scale = float(np.float32(1.0 / (1.0 - p)))
        self.params = Tensor(np.array([p, scale, seed, next(_INSTANCES)], np.float64))

    def construct(self, x):
        y, _ = self.fwd(x, self.params)
        return y


class FusedDropout(nn.Cell):
    """The fused C++ dropout on CPU for float32 (the reference otherwise); see the module docstring. ``seed``:
    None (MindSpore's next op seed) or an int in [0, 2^52)."""

    def __init__(self, p: float, seed: int | None = None):
        super().__init__()
        self.p = _check_p(p)
        seed = _check_seed(seed)
        self.device = kernel_device("FusedDropout", "make_dropout('reference', p)")
        self.kernel = (_CpuDropout(self.p, _op_seed() if seed is None else seed)
                       if self.device == "CPU" and self.p > 0 else None)
        self.reference = ReferenceDropout(self.p)       # float16 / other dtypes, and Ascend

    def construct(self, x):
        if not self.training or self.p == 0.0:
            return x
        if self.kernel is not None and x.dtype == mstype.float32:
            return self.kernel(x)
        return self.reference(x)


def make_dropout(impl: str, p: float) -> nn.Cell:
    """The dropout cell named by ``impl`` ('fused' or 'reference') with drop probability ``p``."""
    if impl == "fused":
        return FusedDropout(p)
    if impl == "reference":
        return ReferenceDropout(p)
    raise ValueError(f"unknown dropout impl {impl!r}; valid: {', '.join(DROPOUT_IMPLS)}")
