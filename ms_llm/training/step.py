"""The training step as two compiled cells: accumulate gradients of a micro-batch; apply the accumulated update.

fp16 (model.compute_dtype float16): the loss is multiplied by a dynamic loss scale before backward; the update step
unscales, skips the update on overflow and halves the scale, and doubles it after ``window`` clean steps
(Micikevicius et al. 2018). Gradients of k micro-batches are averaged, then clipped by global norm, then AdamW.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from ..kernels.sum_squares import FusedSumSquares, sum_squares_ops


_sum_squares = ops.MultitypeFuncGraph("sum_squares")


@_sum_squares.register("Tensor")
def _sum_squares_one(g):
    """sum(g * g) in float32, shape (1,), from MindSpore ops (:mod:`ms_llm.kernels.sum_squares`)."""
    return sum_squares_ops(ops.cast(g, ms.float32))


@_sum_squares.register("Function", "Tensor")
def _sum_squares_kernel(op, g):
    """The same by the one-pass CPU kernel cell ``op``."""
    return op(ops.cast(g, ms.float32))


_accumulate = ops.MultitypeFuncGraph("accumulate")


@_accumulate.register("Tensor", "Tensor")
def _accumulate_one(buf, g):
    return ops.assign_add(buf, ops.cast(g, ms.float32))


_zero = ops.MultitypeFuncGraph("zero")


@_zero.register("Tensor")
def _zero_one(buf):
    return ops.assign(buf, ops.zeros_like(buf))


class ClipAndApply(nn.Cell):
    """construct(grads, lr, pre_scale=None) -> (finite, norm): global L2 norm of ``grads * pre_scale``, clip to
    ``clip`` (if > 0), then the optimizer update unless the norm is inf/NaN (the one update rule of both step paths).
    The scale factors (``pre_scale``, the clip coefficient) go to the optimizer as its gradient scale, which applies
    them inside its per-parameter update, instead of a separate pass multiplying every gradient; the finite check
    is the optimizer's ``apply`` input (an ``if`` would hand the fused update copies of the Parameters)."""

    def __init__(self, optimizer, clip: float):
        super().__init__(auto_prefix=False)
        self.optimizer = optimizer
        self.clip = float(clip)
        # CPU: one read-only pass per gradient (MindSpore's Mul + ReduceSum: ~0.2 s per BERT-base step)
        self.sum_squares = FusedSumSquares() if ms.get_context("device_target") == "CPU" else None
        self.hyper_map = ops.HyperMap()

    def construct(self, grads, lr, pre_scale=None):
        if self.sum_squares is None:
            parts = self.hyper_map(_sum_squares, grads)
        else:
            parts = self.hyper_map(ops.partial(_sum_squares, self.sum_squares), grads)
        norm = ops.sqrt(ops.reshape(ops.addn(parts), ()))
        scale = None
        if pre_scale is not None:
            norm = norm * pre_scale
            scale = pre_scale
        finite = ops.isfinite(norm)
        if self.clip > 0:
            coef = ops.minimum(self.clip / (norm + 1e-6), 1.0)
            scale = coef if scale is None else scale * coef
        done = self.optimizer(grads, lr, scale, finite)                  # no update unless finite
        return ops.depend(finite, done), norm


class FusedStep(nn.Cell):
    """One micro-batch, no loss scaling: loss, gradients, global-norm clip and AdamW in one graph, without the
    accumulation buffers (no add-into-buffer, unscale or zeroing passes over every parameter)."""

    def __init__(self, loss_net, params, optimizer, clip: float):
        super().__init__(auto_prefix=False)
        self.loss_net = loss_net
        self.params = ParameterTuple(params)
        self.update = ClipAndApply(optimizer, clip)
        self.grad = ops.GradOperation(get_by_list=True)

    def construct(self, lr, *inputs):
        loss = self.loss_net(*inputs)
        grads = self.grad(self.loss_net, self.params)(*inputs)
        finite, norm = self.update(grads, lr)
        return loss, finite, norm


class AccumulateGrads(nn.Cell):
    """construct(*batch) -> loss; adds d(loss * scale)/d(params) into the accumulation buffers."""

    def __init__(self, loss_net, params, accum, loss_scale):
        super().__init__(auto_prefix=False)
        self.loss_net = loss_net
        self.params = ParameterTuple(params)
        self.accum = accum
        self.loss_scale = loss_scale
        self.grad = ops.GradOperation(get_by_list=True, sens_param=True)
        self.hyper_map = ops.HyperMap()

    def construct(self, *inputs):
        loss = self.loss_net(*inputs)
        sens = ops.cast(self.loss_scale, loss.dtype)
        grads = self.grad(self.loss_net, self.params)(*inputs, sens)
        return ops.depend(loss, self.hyper_map(_accumulate, self.accum, grads))


class ApplyGrads(nn.Cell):
    """construct(lr) -> (finite, grad_norm, loss_scale): unscale, clip, AdamW (skipped on overflow), zero buffers."""

    def __init__(self, optimizer, accum, loss_scale, good_steps, micro_batches: int, clip: float,
                 dynamic_scale: bool, factor: float, window: int):
        super().__init__(auto_prefix=False)
        self.accum = accum
        self.loss_scale = loss_scale
        self.good_steps = good_steps
        self.k = float(micro_batches)
        self.update = ClipAndApply(optimizer, clip)
        self.dynamic = dynamic_scale
        self.factor = float(factor)
        self.window = float(window)
        self.hyper_map = ops.HyperMap()

    def construct(self, lr):
        inv = 1.0 / (self.k * self.loss_scale)                       # mean over micro-batches, loss unscaled
        finite, norm = self.update(self.accum, lr, inv)
        finite = ops.depend(finite, self.hyper_map(_zero, self.accum))
        if self.dynamic:
            good = ops.select(finite, self.good_steps + 1.0, ops.zeros_like(self.good_steps))
            grow = ops.logical_and(finite, good >= self.window)
            shrunk = ops.maximum(self.loss_scale / self.factor, 1.0)
            scale = ops.select(finite, ops.select(grow, self.loss_scale * self.factor, self.loss_scale), shrunk)
            ops.assign(self.loss_scale, scale)
            ops.assign(self.good_steps, ops.select(grow, ops.zeros_like(good), good))
        return finite, norm, self.loss_scale


class TrainStep:
    """Host-side driver: ``step(micro_batches, lr)`` runs k accumulations then one update."""

    def __init__(self, loss_net, params, train_cfg, dynamic_scale: bool, make_reducer=None):
        """``make_reducer(accum_buffers, params)`` returns a cell averaging the buffers across data-parallel ranks
        in place (called between the micro-batches and the update), or None on one process."""
        from .optim import AdamW
        self.params = list(params)
        self.accum = ParameterTuple(self.params).clone(prefix="grad_accum", init="zeros")
        init_scale = train_cfg.loss_scale if dynamic_scale else 1.0
        self.loss_scale = Parameter(Tensor(init_scale, ms.float32), name="loss_scale", requires_grad=False)
        self.good_steps = Parameter(Tensor(0.0, ms.float32), name="loss_scale_good_steps", requires_grad=False)
        self.optimizer = AdamW(self.params, train_cfg.adam_betas, train_cfg.adam_eps, train_cfg.weight_decay)
        self.accumulate = AccumulateGrads(loss_net, self.params, self.accum, self.loss_scale)
        self.apply = ApplyGrads(self.optimizer, self.accum, self.loss_scale, self.good_steps,
                                train_cfg.grad_accum_steps, train_cfg.grad_clip, dynamic_scale,
                                train_cfg.loss_scale_factor, train_cfg.loss_scale_window)
        self.reducer = make_reducer(self.accum, self.params) if make_reducer is not None else None
        # one micro-batch on one process without loss scaling: a single graph, no accumulation buffers
        self.fused = (FusedStep(loss_net, self.params, self.optimizer, train_cfg.grad_clip)
                      if train_cfg.grad_accum_steps == 1 and not dynamic_scale and self.reducer is None else None)

    def state_parameters(self):
        """Everything besides the model weights that a checkpoint must hold to resume exactly."""
        return list(self.optimizer.m) + list(self.optimizer.v) + [self.optimizer.step, self.loss_scale,
                                                                   self.good_steps]

    def step(self, micro_batches, lr: float):
        if self.fused is not None and len(micro_batches) == 1:
            loss, finite, norm = self.fused(Tensor(lr, ms.float32), *[Tensor(a) for a in micro_batches[0]])
            return float(loss.asnumpy()), bool(finite.asnumpy()), float(norm.asnumpy()), 1.0
        losses = []
        for mb in micro_batches:
            losses.append(self.accumulate(*[Tensor(a) for a in mb]))
        if self.reducer is not None:
            self.reducer()
        finite, norm, scale = self.apply(Tensor(lr, ms.float32))
        loss = sum(float(l.asnumpy()) for l in losses) / len(losses)
        return loss, bool(finite.asnumpy()), float(norm.asnumpy()), float(scale.asnumpy())
