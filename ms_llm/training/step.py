"""The training step as two compiled cells: accumulate gradients of a micro-batch; apply the accumulated update.

fp16 (model.compute_dtype float16): the loss is multiplied by a dynamic loss scale before backward; the update step
unscales, skips the update on overflow and halves the scale, and doubles it after ``window`` clean steps
(Micikevicius et al. 2018). Gradients of k micro-batches are averaged, then clipped by global norm, then AdamW.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops


class AccumulateGrads(nn.Cell):
    """construct(*batch) -> loss; adds d(loss * scale)/d(params) into the accumulation buffers."""

    def __init__(self, loss_net, params, accum, loss_scale):
        super().__init__(auto_prefix=False)
        self.loss_net = loss_net
        self.params = ParameterTuple(params)
        self.accum = accum
        self.loss_scale = loss_scale
        self.grad = ops.GradOperation(get_by_list=True, sens_param=True)

    def construct(self, *inputs):
        loss = self.loss_net(*inputs)
        sens = ops.cast(self.loss_scale, loss.dtype)
        grads = self.grad(self.loss_net, self.params)(*inputs, sens)
        for i in range(len(self.accum)):
            ops.assign_add(self.accum[i], ops.cast(grads[i], ms.float32))
        return loss


class ApplyGrads(nn.Cell):
    """construct(lr) -> (finite, grad_norm, loss_scale): unscale, clip, AdamW (skipped on overflow), zero buffers."""

    def __init__(self, optimizer, accum, loss_scale, good_steps, micro_batches: int, clip: float,
                 dynamic_scale: bool, factor: float, window: int):
        super().__init__(auto_prefix=False)
        self.optimizer = optimizer
        self.accum = accum
        self.loss_scale = loss_scale
        self.good_steps = good_steps
        self.k = float(micro_batches)
        self.clip = float(clip)
        self.dynamic = dynamic_scale
        self.factor = float(factor)
        self.window = float(window)

    def construct(self, lr):
        inv = 1.0 / (self.k * self.loss_scale)
        grads = ()
        sq = ops.zeros((), ms.float32)
        for i in range(len(self.accum)):
            g = self.accum[i] * inv
            grads = grads + (g,)
            sq = sq + ops.sum(g * g)
        norm = ops.sqrt(sq)
        finite = ops.isfinite(norm)
        if self.clip > 0:
            coef = ops.minimum(self.clip / (norm + 1e-6), 1.0)
            grads = tuple(g * coef for g in grads)
        if finite:
            self.optimizer(grads, lr)
        for i in range(len(self.accum)):
            ops.assign(self.accum[i], ops.zeros_like(self.accum[i]))
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

    def state_parameters(self):
        """Everything besides the model weights that a checkpoint must hold to resume exactly."""
        return list(self.optimizer.m) + list(self.optimizer.v) + [self.optimizer.step, self.loss_scale,
                                                                   self.good_steps]

    def step(self, micro_batches, lr: float):
        losses = []
        for mb in micro_batches:
            losses.append(self.accumulate(*[Tensor(a) for a in mb]))
        if self.reducer is not None:
            self.reducer()
        finite, norm, scale = self.apply(Tensor(lr, ms.float32))
        loss = sum(float(l.asnumpy()) for l in losses) / len(losses)
        return loss, bool(finite.asnumpy()), float(norm.asnumpy()), float(scale.asnumpy())
