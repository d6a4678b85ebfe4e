"""One parameter's AdamW step, in place: MindSpore's ``AdamWeightDecay`` (the reference) and a fused CPU kernel with
the same signature.

Both cells are called ``construct(param, m, v, grad, scalars, wd) -> token`` with ``param``, ``m``, ``v`` float32
Parameters and ``grad`` float32 of one shape, ``scalars (7,)`` float32 ``[lr, beta1, beta2, eps, decay_scale,
grad_scale, apply]`` and ``wd`` a float32 scalar (this parameter's weight decay; 0 for norms and biases). With
``apply == 0`` nothing changes (a skipped step, e.g. an overflowed fp16 gradient, which may be inf/NaN: the caller
passes lr 0, betas 1, eps 1, decay 0 then, so the reference's arithmetic is the identity too). Otherwise they update,
in place::

    g = grad * grad_scale
    m = beta1 m + (1 - beta1) g;   v = beta2 v + (1 - beta2) g^2
    param -= lr (m / (sqrt(v) + eps) + wd * decay_scale * param)

(``ms_llm.training.optim.AdamW`` folds Adam's bias correction into ``lr``, ``eps`` and ``decay_scale``, and the
step's clipping / unscaling factor into ``grad_scale``) and return a float32 ``(1,)`` token to order later work on.

* :class:`AdamWUpdateReference`: ``ops.AdamWeightDecay`` on ``grad * grad_scale``.
* :class:`FusedAdamWUpdate`: on CPU the C++ kernel ``AdamWUpdate`` of ``csrc/adamw.cc`` through
  ``ops.Custom(func_type="aot")`` (built with g++ on first construction): one multi-threaded pass over the four
  tensors with the gradient scale folded in (MindSpore 2.10's CPU ``AdamWeightDecay`` moves its 28 bytes per element
  at 7-11 GB/s and the scale costs another pass over every gradient; the machine reads ~21 GB/s). The kernel writes
  ``param``, ``m`` and ``v`` through the pointers MindSpore hands it, which on CPU are the Parameters' own memory
  (tested). On Ascend it is the reference.

Skipping is data (``apply``), not control flow: inside an ``if`` on a tensor, MindSpore 2.10 hands a kernel copies of
the Parameters, so the fused kernel's writes were lost there (measured: a training step under ``if finite:`` left the
weights unchanged); ``ops.AdamWeightDecay`` declares its writes and is not affected.
"""

from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops
from mindspore import dtype as mstype
from mindspore.ops import operations as P

from ._build import build_library
from ._device import kernel_device

__all__ = ["ADAMW_IMPLS", "AdamWUpdateReference", "FusedAdamWUpdate", "make_adamw_update", "select_adamw_impl"]

ADAMW_IMPLS = ("reference", "fused")


def _check_inputs(param, m, v, grad, scalars, wd):
    shapes = f"param {param.shape}, m {m.shape}, v {v.shape}, grad {grad.shape}, scalars {scalars.shape}, wd {wd.shape}"
    if not param.shape == m.shape == v.shape == grad.shape:
        raise ValueError(f"adamw update: param, m, v and grad must share one shape; got {shapes}")
    if scalars.shape != (7,) or wd.shape not in ((), (1,)):
        raise ValueError(f"adamw update: scalars must be (7,) and wd a scalar; got {shapes}")
    for name, t in (("param", param), ("m", m), ("v", v), ("grad", grad), ("scalars", scalars), ("wd", wd)):
        if t.dtype != mstype.float32:
            raise ValueError(f"adamw update: {name} must be float32, got {t.dtype}")


class AdamWUpdateReference(nn.Cell):
    """``ops.AdamWeightDecay`` on ``grad * grad_scale`` (zeros when ``apply == 0``); see the module docstring."""

    def __init__(self):
        super().__init__()
        self.kernel = P.AdamWeightDecay()

    def construct(self, param, m, v, grad, scalars, wd):
        _check_inputs(param, m, v, grad, scalars, wd)
        g = ops.where(scalars[6] > 0, grad * scalars[5], ops.zeros_like(grad))
        out = self.kernel(param, m, v, scalars[0], scalars[1], scalars[2], scalars[3], wd * scalars[4], g)
        return ops.depend(ops.zeros((1,), mstype.float32), out)


class FusedAdamWUpdate(nn.Cell):
    """The in-place C++ AdamW kernel on CPU (the reference on Ascend); see the module docstring."""

    def __init__(self):
        super().__init__()
        self.device = kernel_device("FusedAdamWUpdate", "make_adamw_update('reference')")
        if self.device == "CPU":
            lib = build_library("adamw.cc")
            self.impl = ops.Custom(f"{lib}:AdamWUpdate", out_shape=lambda *shapes: (1,),
                                   out_dtype=lambda *dtypes: mstype.float32, func_type="aot")
        else:
            self.impl = AdamWUpdateReference()

    def construct(self, param, m, v, grad, scalars, wd):
        _check_inputs(param, m, v, grad, scalars, wd)
        return self.impl(param, m, v, grad, scalars, wd)                     # (1,)


def make_adamw_update(impl: str) -> nn.Cell:
    """The one-parameter AdamW cell named by ``impl``: 'fused' or 'reference'."""
    if impl == "fused":
        return FusedAdamWUpdate()
    if impl == "reference":
        return AdamWUpdateReference()
    raise ValueError(f"unknown adamw impl {impl!r}; valid: {', '.join(ADAMW_IMPLS)}")


def select_adamw_impl(impl: str, device_target: str | None = None) -> str:
    """``'auto'`` -> 'fused' on CPU, 'reference' elsewhere; 'fused' / 'reference' as given."""
    if impl not in ("auto",) + ADAMW_IMPLS:
        raise ValueError(f"adamw impl must be one of 'auto', {', '.join(repr(i) for i in ADAMW_IMPLS)}, got {impl!r}")
    if impl != "auto":
        return impl
    device = ms.get_context("device_target") if device_target is None else device_target
    return "fused" if device == "CPU" else "reference"
