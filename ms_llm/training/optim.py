"""AdamW with bias correction and decoupled weight decay (Loshchilov & Hutter 2019), and learning-rate schedules.

MindSpore's ``nn.AdamWeightDecay`` omits Adam's bias correction (it follows the original BERT optimizer), which makes
early steps much larger than torch.optim.AdamW's; this cell follows the paper. The learning rate is an input of every
step, computed on the host from :func:`lr_at`, so a resumed run reproduces the schedule exactly.
"""
from __future__ import annotations

import math

import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from ..kernels.adamw import make_adamw_update, select_adamw_impl

NO_DECAY_KEYS = ("bias", "norm", "layernorm", "ln_", "layer_norm")


def decays(param) -> bool:
    """Weight decay applies to matrices (linear weights, embeddings), never to norms or biases."""
    name = param.name.lower()
    return len(param.shape) >= 2 and not any(k in name for k in NO_DECAY_KEYS)


_adamw_step = ops.MultitypeFuncGraph("adamw_step")


@_adamw_step.register("Function", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor")
def _adamw_step_one(update, scalars, wd, param, m, v, grad):
    """One parameter's in-place AdamW (a cell of :mod:`ms_llm.kernels.adamw`); HyperMap applies it to every
    parameter without unrolling a Python loop into the graph (which made compilation grow with depth and overflowed
    at 48 layers)."""
    return update(param, m, v, ops.cast(grad, ms.float32), scalars, wd)


class AdamW(nn.Cell):
    """construct(grads, lr, grad_scale=None, apply=None) updates ``params`` in place (gradients multiplied by
    ``grad_scale``, e.g. the clipping factor, first) unless ``apply`` (a bool tensor, e.g. "the gradient norm is
    finite") is False, in which case nothing changes, the step count included; returns a dependency token (the step
    count). The skip is data inside the update, not an ``if``: see :mod:`ms_llm.kernels.adamw`.

    ``impl``: the per-parameter update, 'fused' (the C++ kernel of :mod:`ms_llm.kernels.adamw`, CPU), 'reference'
    (MindSpore's ``AdamWeightDecay``) or 'auto' (fused on CPU, reference elsewhere); both compute the same update.
    """

    def __init__(self, params, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01,
                 impl: str = "auto"):
        super().__init__(auto_prefix=False)
        self.params = ParameterTuple(params)
        self.m = self.params.clone(prefix="adam_m", init="zeros")
        self.v = self.params.clone(prefix="adam_v", init="zeros")
        self.step = Parameter(Tensor(0.0, ms.float32), name="adam_step", requires_grad=False)
        self.b1, self.b2, self.eps = float(betas[0]), float(betas[1]), float(eps)
        self.wd = tuple(float(weight_decay) if decays(p) else 0.0 for p in self.params)
        self.impl = select_adamw_impl(impl)
        self.update = make_adamw_update(self.impl)
        self.wd_t = tuple(Tensor(w, ms.float32) for w in self.wd)
        self.one = Tensor(1.0, ms.float32)
        self.beta1 = Tensor(self.b1, ms.float32)
        self.beta2 = Tensor(self.b2, ms.float32)
        # the scalars of a skipped step: lr 0, betas 1, eps 1, no decay, no gradient: the identity update
        self.skip_scalars = Tensor([0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0], ms.float32)
        self.hyper_map = ops.HyperMap()

    def construct(self, grads, lr, grad_scale=None, apply=None):
        """Bias correction folded into the update's scalars: (m/c1) / (sqrt(v/c2) + eps) + wd p equals
        (sqrt(c2)/c1) [m / (sqrt(v) + eps sqrt(c2)) + wd c1/sqrt(c2) p], so lr' = lr sqrt(c2)/c1,
        eps' = eps sqrt(c2), decay' = wd c1/sqrt(c2) make AdamWeightDecay's one in-place pass exact AdamW."""
        a = self.one if apply is None else ops.cast(apply, ms.float32)
        t = self.step + a
        ops.assign(self.step, t)
        c1 = 1.0 - ops.pow(self.b1, t)
        sc2 = ops.sqrt(1.0 - ops.pow(self.b2, t))
        lr_t = ops.cast(lr, ms.float32) * sc2 / c1
        scale = self.one if grad_scale is None else ops.cast(grad_scale, ms.float32)
        scalars = ops.stack([lr_t, self.beta1, self.beta2, self.eps * sc2, c1 / sc2, scale, self.one])   # (7,)
        scalars = ops.where(a > 0, scalars, self.skip_scalars)                # (7,); t = 0 gives inf/NaN above
        done = self.hyper_map(ops.partial(_adamw_step, self.update, scalars), self.wd_t, self.params, self.m,
                              self.v, grads)
        return ops.depend(t, done)


def lr_at(step: int, cfg, hidden_size: int) -> float:
    """Learning rate of optimizer update ``step`` (0-based) for TrainConfig ``cfg``.

    constant / cosine / linear: linear warm-up to cfg.lr over warmup_steps, then constant, cosine or linear decay to
    min_lr at cfg.steps. inverse_sqrt: Vaswani et al. 2017 eq. 3, lr = d^-0.5 * min(n^-0.5, n * warmup^-1.5) with
    n = step + 1, multiplied by cfg.lr (1.0 gives the paper's schedule).
    """
    n = step + 1
    w = cfg.warmup_steps
    if cfg.schedule == "inverse_sqrt":
        return cfg.lr * hidden_size ** -0.5 * min(n ** -0.5, n * max(w, 1) ** -1.5)
    if w and n <= w:
        return cfg.lr * n / w
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (n - w) / max(1, cfg.steps - w))
    if cfg.schedule == "cosine":
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))
    return cfg.lr + (cfg.min_lr - cfg.lr) * progress
