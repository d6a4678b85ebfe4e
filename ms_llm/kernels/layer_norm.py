"""LayerNorm over the last axis with a fused CPU forward/backward, and MindSpore's ``ops.LayerNorm`` as its
same-signature reference.

Both cells are built with ``eps`` and called ``construct(x, gamma, beta) -> y`` with ``x (..., H)``, ``gamma`` and
``beta (H,)``, all float32: ``y = (x - mean) / sqrt(var + eps) * gamma + beta`` over the last axis (biased
variance). Gradients flow to all three inputs. Shape and dtype errors raise ValueError naming the shapes, before
anything is compiled.

* :class:`ReferenceLayerNorm`: ``ops.LayerNorm`` and its MindSpore backward (``LayerNormGrad``).
* :class:`FusedLayerNorm`: on CPU the C++ kernels ``LayerNormFwd`` / ``LayerNormBwd`` of ``csrc/layer_norm.cc``
  through ``ops.Custom(func_type="aot")``, the backward wired as the bprop (it reuses the forward's row mean and
  1/std). MindSpore 2.10's CPU ``LayerNormGrad`` takes ~24 ms on a (1024, 768) tensor inside a BERT-base step; the
  kernels make one or two passes over rows held in L1. On Ascend it is the reference.

:class:`ms_llm.layers.norm.LayerNorm` uses the fused cell on CPU and the reference elsewhere.
"""

from __future__ import annotations

import numpy as np
from mindspore import Tensor, nn, ops
from mindspore import dtype as mstype

from ._build import build_library
from ._device import kernel_device

__all__ = ["LAYER_NORM_IMPLS", "ReferenceLayerNorm", "FusedLayerNorm", "make_layer_norm"]

LAYER_NORM_IMPLS = ("reference", "fused")


def _check_inputs(x, gamma, beta):
    shapes = f"x {x.shape}, gamma {gamma.shape}, beta {beta.shape}"
    if len(x.shape) < 1 or gamma.shape != (x.shape[-1],) or beta.shape != (x.shape[-1],):
        raise ValueError(f"layer norm: gamma and beta must be (H,) with H = x.shape[-1]; got {shapes}")
    if x.dtype != mstype.float32 or gamma.dtype != mstype.float32 or beta.dtype != mstype.float32:
        raise ValueError(f"layer norm: x, gamma and beta must be float32; got {x.dtype}, {gamma.dtype}, "
                         f"{beta.dtype} for {shapes}")


class ReferenceLayerNorm(nn.Cell):
    """``ops.LayerNorm`` over the last axis; see the module docstring."""

    def __init__(self, eps: float):
        super().__init__()
        self.norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=float(eps))

    def construct(self, x, gamma, beta):
        _check_inputs(x, gamma, beta)
        y, _, _ = self.norm(x, gamma, beta)
        return y


class _CpuLayerNorm(nn.Cell):
    """The aot C++ forward with the aot C++ backward as its bprop."""

    def __init__(self, eps: float):
        super().__init__()
        lib = build_library("layer_norm.cc")
        rows = lambda x: (int(np.prod(x[:-1])) if len(x) > 1 else 1,)     # noqa: E731

        bwd = ops.Custom(f"{lib}:LayerNormBwd",
                         out_shape=lambda x, g, mean, rstd, dy: (x, g, g),
                         out_dtype=lambda x, g, mean, rstd, dy: (x, x, x), func_type="aot")

        def bprop(x, gamma, beta, params, out, dout):
            dx, dgamma, dbeta = bwd(x, gamma, out[1], out[2], dout[0])
            return dx, dgamma, dbeta, ops.zeros_like(params)

        self.fwd = ops.Custom(f"{lib}:LayerNormFwd",
                              out_shape=lambda x, g, b, p: (x, rows(x), rows(x)),
                              out_dtype=lambda x, g, b, p: (x, x, x), func_type="aot", bprop=bprop)
        self.params = Tensor(np.array([eps], np.float32))

    def construct(self, x, gamma, beta):
        y, _, _ = self.fwd(x, gamma, beta, self.params)
        return y


class FusedLayerNorm(nn.Cell):
    """The fused C++ LayerNorm on CPU (the reference on Ascend); see the module docstring."""

    def __init__(self, eps: float):
        super().__init__()
        self.device = kernel_device("FusedLayerNorm", "make_layer_norm('reference', eps)")
        self.impl = _CpuLayerNorm(eps) if self.device == "CPU" else ReferenceLayerNorm(eps)

    def construct(self, x, gamma, beta):
        _check_inputs(x, gamma, beta)
        return self.impl(x, gamma, beta)


def make_layer_norm(impl: str, eps: float) -> nn.Cell:
    """The LayerNorm cell named by ``impl``: 'fused' or 'reference'."""
    if impl == "fused":
        return FusedLayerNorm(eps)
    if impl == "reference":
        return ReferenceLayerNorm(eps)
    raise ValueError(f"unknown layer norm impl {impl!r}; valid: {', '.join(LAYER_NORM_IMPLS)}")
