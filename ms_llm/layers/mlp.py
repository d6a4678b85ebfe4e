"""Position-wise feed-forward: plain (ReLU / GELU) or gated (SwiGLU, GeGLU, ReGLU)."""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from ..kernels.gelu import GELU_KINDS, FusedGelu, gelu_tanh
from .common import dropout
from .linear import Linear


class Activation(nn.Cell):
    """Named activation: relu, gelu (erf), gelu_new (tanh approximation, GPT-2), silu.

    ``fused`` (default True): on CPU the GELU forms of float32 inputs run the fused C++ forward/backward of
    :mod:`ms_llm.kernels.gelu` (MindSpore's CPU GeLU + GeLUGrad are ~13x slower, the tanh form from ops ~3x);
    False keeps MindSpore's ops everywhere (the fused decode layer's reference).
    """

    def __init__(self, name: str, fused: bool = True):
        super().__init__()
        valid = ("relu", "gelu", "gelu_new", "silu")
        if name not in valid:
            raise ValueError(f"unknown activation '{name}'; valid: {valid}")
        self.name = name
        on_cpu = ms.get_context("device_target") == "CPU"
        self.fused = FusedGelu(name) if fused and on_cpu and name in GELU_KINDS else None

    def construct(self, x):
        if self.fused is not None and x.dtype == ms.float32:
            return self.fused(x)
        if self.name == "relu":
            return ops.relu(x)
        if self.name == "gelu":
            return ops.gelu(x, approximate="none")
        if self.name == "gelu_new":
            # 0.5 x (1 + tanh(z)) == x sigmoid(2 z): same function, and on CPU ~10x faster forward + backward than
            # MindSpore's GeLU kernel (171 vs 18 ms on 512 x 3072; bench/README.md)
            return gelu_tanh(x)
        return ops.silu(x)


GATE_OF = {"swiglu": "silu", "geglu": "gelu", "reglu": "relu"}


class FeedForward(nn.Cell):
    """FFN(x) = W2 act(W1 x) or, gated, W2 (act(W_gate x) * W_up x)."""

    def __init__(self, hidden: int, ffn_hidden: int, activation: str, has_bias: bool = True,
                 dropout_rate: float = 0.0, init_std: float = 0.02, out_init_std: float | None = None,
                 compute_dtype: str = "float32"):
        super().__init__()
        self.gated = activation in GATE_OF
        self.act = Activation(GATE_OF.get(activation, activation))
        kw = dict(has_bias=has_bias, compute_dtype=compute_dtype)
        self.fc_in = Linear(hidden, ffn_hidden, "embed", "mlp", init_std=init_std, **kw)
        self.fc_gate = Linear(hidden, ffn_hidden, "embed", "mlp", init_std=init_std, **kw) if self.gated else None
        self.fc_out = Linear(ffn_hidden, hidden, "mlp", "embed",
                             init_std=init_std if out_init_std is None else out_init_std, **kw)
        self.dropout = dropout(dropout_rate)

    def construct(self, x):
        if self.gated:
            h = self.act(self.fc_gate(x)) * self.fc_in(x)                   # (B, S, F)
        else:
            h = self.act(self.fc_in(x))                                     # (B, S, F)
        return self.fc_out(self.dropout(h))                                 # (B, S, H)


def make_ffn(cfg, ffn_hidden: int | None = None) -> FeedForward:
    """The dense feed-forward a ModelConfig describes (GPT-2 style scaled init of the output projection)."""
    return FeedForward(cfg.hidden_size, cfg.ffn_hidden_size if ffn_hidden is None else ffn_hidden, cfg.activation,
                       has_bias=cfg.use_bias, dropout_rate=cfg.dropout, init_std=cfg.initializer_range,
                       compute_dtype=cfg.compute_dtype)
