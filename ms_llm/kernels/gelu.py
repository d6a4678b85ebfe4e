"""GELU (exact, erf) and its tanh approximation ("gelu_new", GPT-2) with a fused CPU forward/backward, and
MindSpore ops as their same-signature reference.

Both cells are built with ``kind`` ('gelu' or 'gelu_new') and called ``construct(x) -> y`` with float32 ``x`` of any
shape; gradients flow to ``x``. A dtype other than float32 raises ValueError, before anything is compiled.

* exact: ``y = x Phi(x)`` with ``Phi`` the standard normal CDF, ``(1 + erf(x / sqrt 2)) / 2``;
* tanh: ``y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``, computed as ``x sigmoid(2 z)`` (the same function).

* :class:`ReferenceGelu`: ``ops.gelu(approximate='none')`` for the exact form and ``x * sigmoid(2 z)`` from
  MindSpore ops for the tanh form, with MindSpore's backward.
* :class:`FusedGelu`: on CPU the C++ kernels ``GeluFwd`` / ``GeluBwd`` of ``csrc/gelu.cc`` through
  ``ops.Custom(func_type="aot")``, the backward wired as the bprop: one threaded, vectorised pass each (erf by
  Abramowitz & Stegun 7.1.26, absolute error <= 1.5e-7; a polynomial exp). MindSpore 2.10's CPU GeLU + GeLUGrad
  take ~170 ms on a (512, 3072) tensor (``bench/bench_train_kernels.py``). On Ascend it is the reference.

:class:`ms_llm.layers.mlp.Activation` uses the fused cell on CPU for float32 inputs and the reference elsewhere.
"""

from __future__ import annotations

import numpy as np
from mindspore import Tensor, nn, ops
from mindspore import dtype as mstype

from ._build import build_library
from ._device import kernel_device

__all__ = ["GELU_IMPLS", "GELU_KINDS", "ReferenceGelu", "FusedGelu", "make_gelu"]

GELU_IMPLS = ("reference", "fused")
GELU_KINDS = {"gelu": 0.0, "gelu_new": 1.0}      # kind -> the kernel's params[0]


def _check_kind(kind: str) -> None:
    if kind not in GELU_KINDS:
        raise ValueError(f"gelu kind must be one of {', '.join(repr(k) for k in GELU_KINDS)}; got {kind!r}")


def _check_input(x):
    if x.dtype != mstype.float32:
        raise ValueError(f"gelu: x must be float32; got {x.dtype} of shape {x.shape}")


def gelu_tanh(x):
    """``0.5 x (1 + tanh(z))`` as ``x sigmoid(2 z)``, ``z = sqrt(2/pi) (x + 0.044715 x^3)``, from MindSpore ops (on
    CPU ~10x faster forward + backward than MindSpore's GeLU kernel; any float dtype)."""
    return x * ops.sigmoid(x * (1.5957691216057308 + 0.0713548162726009 * (x * x)))


class ReferenceGelu(nn.Cell):
    """MindSpore ops; see the module docstring."""

    def __init__(self, kind: str):
        super().__init__()
        _check_kind(kind)
        self.exact = kind == "gelu"

    def construct(self, x):
        _check_input(x)
        if self.exact:
            return ops.gelu(x, approximate="none")
        return gelu_tanh(x)


class _CpuGelu(nn.Cell):
    """The aot C++ forward with the aot C++ backward as its bprop."""

    def __init__(self, kind: str):
        super().__init__()
        lib = build_library("gelu.cc")
        bwd = ops.Custom(f"{lib}:GeluBwd", out_shape=lambda x, dy, p: x, out_dtype=lambda x, dy, p: x,
                         func_type="aot")

        def bprop(x, params, out, dout):
            return bwd(x, dout, params), ops.zeros_like(params)

        self.fwd = ops.Custom(f"{lib}:GeluFwd", out_shape=lambda x, p: x, out_dtype=lambda x, p: x,
                              func_type="aot", bprop=bprop)
        self.params = Tensor(np.array([GELU_KINDS[kind]], np.float32))

    def construct(self, x):
        return self.fwd(x, self.params)


class FusedGelu(nn.Cell):
    """The fused C++ GELU on CPU (the reference on Ascend); see the module docstring."""

    def __init__(self, kind: str):
        super().__init__()
        _check_kind(kind)
        self.device = kernel_device("FusedGelu", "make_gelu('reference', kind)")
        self.impl = _CpuGelu(kind) if self.device == "CPU" else ReferenceGelu(kind)

    def construct(self, x):
        _check_input(x)
        return self.impl(x)


def make_gelu(impl: str, kind: str) -> nn.Cell:
    """The GELU cell named by ``impl`` ('fused' or 'reference') for ``kind`` ('gelu' or 'gelu_new')."""
    if impl == "fused":
        return FusedGelu(kind)
    if impl == "reference":
        return ReferenceGelu(kind)
    raise ValueError(f"unknown gelu impl {impl!r}; valid: {', '.join(GELU_IMPLS)}")
