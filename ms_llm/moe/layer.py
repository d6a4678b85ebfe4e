"""The sparse feed-forward: route -> dispatch -> experts -> combine, and per-layer load statistics for the trainer."""
from __future__ import annotations

from typing import Dict

import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from .dispatcher import Dispatcher
from .experts import Experts
from .router import AUX_LOSS, DROPPED, LOAD, LOSS_NAMES, LOSSES, SLOT_TOKEN, SLOT_WEIGHT, make_router


class MoELayer(nn.Cell):
    """Mixture-of-experts feed-forward for ``TransformerBlock(..., ffn=MoELayer(cfg), ffn_returns_aux=True)``.

    ``construct(x (B, S, H)) -> (y (B, S, H) float32, aux_loss ())``; each sequence is one routing group. Every
    call also stores its routing statistics in three non-trainable parameters (``load_stat`` (E,), ``dropped_stat``,
    ``loss_stat`` (4,)), the way BatchNorm keeps moving statistics, so the trainer reads the last step's values with
    :func:`moe_stats` at no extra cost.
    """

    def __init__(self, cfg, out_init_std: float | None = None):
        super().__init__()
        m = cfg.moe
        if m.num_experts < 1:
            raise ValueError(f"MoELayer needs model.moe.num_experts >= 1, got {m.num_experts}")
        self.num_experts = m.num_experts
        self.router = make_router(cfg)
        self.dispatcher = Dispatcher(impl=m.dispatch_impl)
        self.experts = Experts(m.num_experts, cfg.hidden_size, m.expert_ffn_hidden_size or cfg.ffn_hidden_size,
                               m.expert_activation or cfg.activation, has_bias=cfg.use_bias,
                               dropout_rate=m.expert_dropout, init_std=cfg.initializer_range,
                               out_init_std=out_init_std, compute_dtype=cfg.compute_dtype)
        self.load_stat = Parameter(Tensor(np.zeros(m.num_experts, np.float32)), name="load_stat", requires_grad=False)
        self.dropped_stat = Parameter(Tensor(np.zeros((), np.float32)), name="dropped_stat", requires_grad=False)
        self.loss_stat = Parameter(Tensor(np.zeros(len(LOSS_NAMES), np.float32)), name="loss_stat",
                                   requires_grad=False)

    def record(self, r):
        ops.assign(self.load_stat, r[LOAD])
        ops.assign(self.dropped_stat, r[DROPPED])
        ops.assign(self.loss_stat, ops.stop_gradient(r[LOSSES]))

    def construct(self, x):
        r = self.router(x)                                                       # slots (B, E, C), losses, stats
        h = self.experts(self.dispatcher.dispatch(x, r[SLOT_TOKEN]))             # (E, B*C, H)
        y = self.dispatcher.combine(h, r[SLOT_TOKEN], r[SLOT_WEIGHT], x.shape[1])  # (B, S, H)
        self.record(r)
        return y, r[AUX_LOSS]


def check_causal_routing(cfg, where: str) -> None:
    """Raise ValueError if MoE layers of a causal stack (``where``) would use expert-choice routing.

    Expert choice lets each expert pick its top tokens over the whole routing group, so whether a token is
    processed depends on the tokens after it: the language-model loss sees the future and step-by-step decoding
    cannot reproduce training-time routing (Zhou et al. 2022, "Limitations"). Token-choice routers decide per token.
    """
    if cfg.moe.num_experts and cfg.moe.router == "expert_choice":
        raise ValueError(f"model.moe.router='expert_choice' cannot route the causal {where}: an expert's choice "
                         f"of tokens depends on later tokens of the sequence (Zhou et al. 2022); use 'topk' or "
                         f"'noisy_topk'")


STAT_PARAMS = ("load_stat", "dropped_stat", "loss_stat")


def is_stat_param(name: str) -> bool:
    """Whether a parameter name is one of the MoE statistics buffers (not a weight; skip it in converters)."""
    return name.rsplit(".", 1)[-1] in STAT_PARAMS


def moe_stats(model: nn.Cell) -> Dict[str, float]:
    """Routing statistics of every MoE layer from the model's last forward pass, as flat metric names.

    Per layer (``moe/<cell path>/...``): ``load_e<i>`` fraction of routing requests that chose expert i (the
    histogram), ``dropped`` fraction of requests over capacity, ``overload`` = max load / mean load, and the
    unweighted auxiliary losses (``load_balance``, ``z_loss``, ``importance``, ``load``). Across layers:
    ``moe/dropped`` (mean), ``moe/overload`` (max). Empty dict for a dense model.
    """
    out: Dict[str, float] = {}
    dropped, overload = [], []
    for name, cell in model.cells_and_names():
        if not isinstance(cell, MoELayer):
            continue
        load = cell.load_stat.asnumpy().astype(np.float64)
        prefix = f"moe/{name or type(cell).__name__}"
        for i, v in enumerate(load):
            out[f"{prefix}/load_e{i}"] = float(v)
        mean = load.mean()
        over = float(load.max() / mean) if mean > 0 else 0.0
        out[f"{prefix}/dropped"] = float(cell.dropped_stat.asnumpy())
        out[f"{prefix}/overload"] = over
        for n, v in zip(LOSS_NAMES, cell.loss_stat.asnumpy()):
            out[f"{prefix}/{n}"] = float(v)
        dropped.append(out[f"{prefix}/dropped"])
        overload.append(over)
    if dropped:
        out["moe/dropped"] = float(np.mean(dropped))
        out["moe/overload"] = float(np.max(overload))
    return out


def moe_log_metrics(model: nn.Cell, batch=None) -> Dict[str, float]:
    """:attr:`Task.log_metrics <ms_llm.training.task.Task>` hook: :func:`moe_stats` of the step that just ran on
    ``batch`` (the statistics were written by that step's forward pass, so ``batch`` is not run again; with
    gradient accumulation they are those of its last micro-batch)."""
    return moe_stats(model)
