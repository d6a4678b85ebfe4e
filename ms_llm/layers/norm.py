"""LayerNorm (with or without bias) and RMSNorm, computed in float32."""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from ..kernels.layer_norm import FusedLayerNorm
from .common import const_param


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis; ``has_bias=False`` gives a scale-only norm."""

    def __init__(self, hidden: int, eps: float = 1e-5, has_bias: bool = True):
        super().__init__()
        self.hidden = hidden
        self.has_bias = has_bias
        self.weight = const_param((hidden,), 1.0, "weight")
        self.bias = const_param((hidden,), 0.0, "bias") if has_bias else None
        self.zero_bias = ops.zeros((hidden,), ms.float32)
        self.norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)
        # CPU: the fused C++ forward/backward (MindSpore's CPU LayerNormGrad is ~3x slower, kernels/layer_norm.py);
        # elsewhere ops.LayerNorm, whose strategy shard() sets
        self.fused = FusedLayerNorm(eps) if ms.get_context("device_target") == "CPU" else None
        self.cast = ops.Cast()

    def construct(self, x):
        dtype = x.dtype
        bias = self.bias if self.has_bias else self.zero_bias
        if self.fused is not None:
            return self.cast(self.fused(self.cast(x, ms.float32), self.weight, bias), dtype)
        y, _, _ = self.norm(self.cast(x, ms.float32), self.weight, bias)
        return self.cast(y, dtype)

    def param_axes(self):
        """Logical axes of this cell's parameters (for strategy files and checkpoint re-sharding)."""
        return {"weight": ("embed",), "bias": ("embed",)} if self.has_bias else {"weight": ("embed",)}

    def shard(self, sharder):
        sharder.shard(self.norm, "norm", ("batch", "seq", "embed"), ("embed",), ("embed",))


class RMSNorm(nn.Cell):
    """y = x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich 2019; T5's scale-only norm is the same)."""

    def __init__(self, hidden: int, eps: float = 1e-6):
        super().__init__()
        self.hidden = hidden
        self.eps = eps
        self.weight = const_param((hidden,), 1.0, "weight")
        self.square = ops.Square()
        self.mean = ops.ReduceMean(keep_dims=True)
        self.rsqrt = ops.Rsqrt()
        self.mul = ops.Mul()
        self.mul_w = ops.Mul()
        self.cast = ops.Cast()

    def construct(self, x):
        dtype = x.dtype
        x = self.cast(x, ms.float32)
        var = self.mean(self.square(x), -1)                              # (..., 1)
        y = self.mul(x, self.rsqrt(var + self.eps))
        return self.cast(self.mul_w(y, self.weight), dtype)

    def param_axes(self):
        """Logical axes of this cell's parameters (for strategy files and checkpoint re-sharding)."""
        return {"weight": ("embed",)}

    def shard(self, sharder):
        sharder.shard(self.square, "square", ("batch", "seq", "embed"))
        sharder.shard(self.mul_w, "mul_w", ("batch", "seq", "embed"), ("embed",))


def make_norm(cfg, hidden: int | None = None) -> nn.Cell:
    """The norm that ``cfg.norm`` names."""
    hidden = cfg.hidden_size if hidden is None else hidden
    if cfg.norm == "rmsnorm":
        return RMSNorm(hidden, cfg.norm_eps)
    return LayerNorm(hidden, cfg.norm_eps, cfg.norm_bias)
