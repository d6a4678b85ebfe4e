"""GLaM (Du et al. 2022): a decoder-only language model with a top-2 mixture of experts in every other layer.

GLaM is the GPT decoder (:class:`~ms_llm.models.gpt.GPTLMHeadModel`) whose feed-forward in layers with
``moe.is_moe_layer(i)`` (odd layers by default) is an :class:`~ms_llm.moe.MoELayer`: GShard top-2 gating
(``router: topk``, ``top_k: 2``, gates renormalised over the two experts, optional random second-expert
dispatch), capacity per sequence, load-balancing loss. As in the paper, dense feed-forwards use a gated GELU
(``activation: geglu``) while experts are plain two-matrix GELU networks (``moe.expert_activation: gelu``).

``construct(input_ids, attention_mask=None, position_ids=None) -> (logits (B, S, V), aux_loss)``.

:func:`glam_param_count` counts total and per-token activated parameters from a config without building it
(checked against instantiated models in tests); :func:`paper_table` prints them beside Table 4 of the paper.
Positions: the paper uses Transformer-XL's per-layer relative position bias, which ms_llm does not implement; the
shipped configs use rotary embeddings (no parameters), see :data:`PAPER_NOTES`.
"""
from __future__ import annotations

import math
import os
from typing import Iterable, List, Optional, Tuple

import numpy as np
from mindspore import Tensor

from ..moe.layer import MoELayer, check_causal_routing
from .gpt import GPTLMHeadModel, gpt_param_count


def check_glam_config(cfg) -> None:
    """Raise ValueError naming the key for settings GLaM cannot honour."""
    if cfg.moe.num_experts < 1:
        raise ValueError("model.moe.num_experts: GLaM needs experts (>= 1)")
    if not any(cfg.moe.is_moe_layer(i) for i in range(cfg.num_layers)):
        raise ValueError(f"model.moe.moe_every/moe_offset: no layer of {cfg.num_layers} is an MoE layer")
    check_causal_routing(cfg, "GLaM decoder")


def glam_ffn(cfg, i: int):
    """``make_ffn`` hook of the GPT decoder: an MoE feed-forward in MoE layers, the default dense one elsewhere."""
    if not cfg.moe.is_moe_layer(i):
        return None
    out_std = cfg.initializer_range / math.sqrt(2.0 * cfg.num_layers)      # GPT-2 scaled residual init
    return MoELayer(cfg, out_init_std=out_std), True


class GLaM(GPTLMHeadModel):
    """GLaM decoder-only MoE language model; ``cls(cfg: ModelConfig)``."""

    def __init__(self, cfg):
        check_glam_config(cfg)
        super().__init__(cfg, make_ffn=glam_ffn)

    def init_weights(self, seed: int | None = None) -> None:
        """The GPT-2 scheme of :meth:`GPTLMHeadModel.init_weights`, with the experts' output matrices treated as
        residual output projections (std / sqrt(2 L)) and expert biases set to 0."""
        super().init_weights(seed)
        rng = np.random.default_rng(None if seed is None else int(seed) + 1)
        out_std = self.cfg.initializer_range / math.sqrt(2.0 * self.cfg.num_layers)
        for name, p in self.parameters_and_names():
            if name.endswith("experts.w_out"):
                p.set_data(Tensor(rng.normal(0.0, out_std, size=p.shape).astype(np.float32)))
            elif name.endswith(("experts.b_in", "experts.b_out")):
                p.set_data(Tensor(np.zeros(p.shape, np.float32)))


def _expert_params(cfg) -> Tuple[int, int]:
    """(parameters of one expert, parameters of the router) of an MoE layer."""
    m = cfg.moe
    h, f = cfg.hidden_size, m.expert_ffn_hidden_size or cfg.ffn_hidden_size
    act = m.expert_activation or cfg.activation
    n_mats = 3 if act in ("swiglu", "geglu", "reglu") else 2
    bias = (f + h) if cfg.use_bias else 0
    router = m.num_experts * h + (m.num_experts if m.router_bias else 0)
    return n_mats * h * f + bias, router


def glam_param_count(cfg) -> Tuple[int, int]:
    """(total, activated per token) trainable parameters of ``GLaM(cfg)``, from shapes alone.

    Activated = every non-expert parameter (embeddings, attention, norms, dense FFNs, routers) + ``top_k`` experts
    per MoE layer. The (tied) embedding counts once.
    """
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    dense_ffn = (3 if cfg.is_gated else 2) * h * f + (((3 if cfg.is_gated else 2) - 1) * f + h if cfg.use_bias else 0)
    n_moe = sum(cfg.moe.is_moe_layer(i) for i in range(cfg.num_layers))
    expert, router = _expert_params(cfg)
    base = gpt_param_count(cfg) - n_moe * dense_ffn + n_moe * router
    return base + n_moe * cfg.moe.num_experts * expert, base + n_moe * cfg.moe.top_k * expert


# Table 4 of Du et al. 2022 (arXiv:2112.06905): n_params and n_act-params by config file stem. Only the 64B/64E
# figures are used as a check; the smaller models' totals are printed for orientation.
PAPER = {
    "glam_0.1b_64e": (1.9e9, None),
    "glam_1.7b_64e": (27e9, None),
    "glam_8b_64e": (143e9, None),
    "glam_64b_64e": (1.2e12, 96.6e9),
}
PAPER_NOTES = (
    "Paper figures are rounded (1.2T = two significant digits; anything in [1.15T, 1.25T) prints as 1.2T).",
    "Embeddings: 256K-token vocabulary x d_model, tied input/output, counted once (2.1B of the 64B/64E model's "
    "96.6B activated parameters; without it the activated count would be 94.5B).",
    "Dense FFNs are gated GELU (3 matrices of d_model x H), experts plain GELU (2 matrices): with both gated the "
    "64B/64E model would activate 111.7B, with neither 103.1B, neither matches 96.6B.",
    "Positions: rotary (0 parameters) instead of the paper's Transformer-XL relative bias; the paper's counts "
    "evidently exclude those parameters (96.6B is matched without them).",
    "The smaller models' totals with the same 256K vocabulary differ from the paper by the embedding "
    "(0.1B/64E: 2.08B vs 1.9B; with a 32K vocabulary it would be 1.91B): the paper does not state the small "
    "models' vocabulary.",
)


def paper_table(paths: Iterable[str]) -> List[str]:
    """Markdown rows: config, layers, d_model, H, experts, our total / activated, the paper's, relative difference."""
    from ..config import load_config
    rows = ["| config | L | M | H | E | total (ours) | total (paper) | diff | activated (ours) | "
            "activated (paper) | diff |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda n: "-" if n is None else (f"{n / 1e12:.3f}T" if n >= 1e12 else f"{n / 1e9:.3f}B")   # noqa: E731
    diff = lambda a, b: "-" if b is None else f"{100 * (a - b) / b:+.1f}%"                          # noqa: E731
    for path in paths:
        cfg = load_config(path).model
        total, active = glam_param_count(cfg)
        name = os.path.splitext(os.path.basename(path))[0]
        p_total, p_active = PAPER.get(name, (None, None))
        rows.append(f"| {name} | {cfg.num_layers} | {cfg.hidden_size} | {cfg.ffn_hidden_size} | "
                    f"{cfg.moe.num_experts} | {fmt(total)} | {fmt(p_total)} | {diff(total, p_total)} | "
                    f"{fmt(active)} | {fmt(p_active)} | {diff(active, p_active)} |")
    return rows


def main(argv: Optional[List[str]] = None) -> None:
    """``python -m ms_llm.models.glam configs/glam/glam_*.yaml``: print the parameter table and the notes."""
    import sys
    paths = argv if argv is not None else sys.argv[1:]
    if not paths:
        raise SystemExit("usage: python -m ms_llm.models.glam CONFIG.yaml [...]")
    print("\n".join(paper_table(paths)))
    print()
    print("\n".join(f"- {n}" for n in PAPER_NOTES))


if __name__ == "__main__":
    main()
