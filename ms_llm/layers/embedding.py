"""Token, position (learned / sinusoidal), segment embeddings and rotary position embeddings."""
from __future__ import annotations

import math

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from .common import normal_param


class Embedding(nn.Cell):
    """Lookup table (num, dim) with logical axes (``axis``, 'embed')."""

    def __init__(self, num: int, dim: int, init_std: float = 0.02, axis: str = "vocab"):
        super().__init__()
        self.num = num
        self.dim = dim
        self.axis = axis
        self.weight = normal_param((num, dim), init_std, "weight")
        self.gather = ops.Gather()

    def construct(self, ids):
        return self.gather(self.weight, ids, 0)                          # (*ids.shape, dim)

    def param_axes(self):
        """Logical axes of this cell's parameters (for strategy files and checkpoint re-sharding)."""
        return {"weight": (self.axis, "embed")}

    def shard(self, sharder):
        sharder.shard(self.gather, "gather", (self.axis, "embed"), ("batch", "seq"))


def sinusoidal_table(num: int, dim: int) -> np.ndarray:
    """Vaswani et al. 2017 section 3.5: PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...)."""
    pos = np.arange(num, dtype=np.float64)[:, None]
    i = np.arange(0, dim, 2, dtype=np.float64)[None, :]
    angle = pos / np.power(10000.0, i / dim)
    table = np.zeros((num, dim), dtype=np.float64)
    table[:, 0::2] = np.sin(angle)
    table[:, 1::2] = np.cos(angle[:, : dim // 2])
    return table.astype(np.float32)


class SinusoidalPositions(nn.Cell):
    """Fixed sinusoidal position table (not trained)."""

    def __init__(self, num: int, dim: int):
        super().__init__()
        self.table = Parameter(Tensor(sinusoidal_table(num, dim)), name="table", requires_grad=False)
        self.gather = ops.Gather()

    def construct(self, positions):
        return self.gather(self.table, positions, 0)                     # (*positions.shape, dim)


def rotary_tables(num: int, dim: int, theta: float):
    """cos/sin tables (num, dim) for RoPE in the rotate-half layout used by Llama / GPT-NeoX."""
    inv = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))   # (dim/2,)
    freqs = np.arange(num, dtype=np.float64)[:, None] * inv[None, :]       # (num, dim/2)
    emb = np.concatenate([freqs, freqs], axis=-1)                          # (num, dim)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


class RotaryEmbedding(nn.Cell):
    """Applies RoPE (Su et al. 2021) to q/k of shape (B, nh, S, hd) (``layout`` 'BNSD') or (B, S, nh, hd)
    ('BSND') at given positions (B, S)."""

    def __init__(self, max_positions: int, dim: int, theta: float = 10000.0, layout: str = "BNSD"):
        super().__init__()
        if layout not in ("BNSD", "BSND"):
            raise ValueError(f"RotaryEmbedding layout must be 'BNSD' or 'BSND', got {layout!r}")
        self.head_axis = 2 if layout == "BSND" else 1
        cos, sin = rotary_tables(max_positions, dim, theta)
        self.cos = Parameter(Tensor(cos), name="cos", requires_grad=False)
        self.sin = Parameter(Tensor(sin), name="sin", requires_grad=False)
        self.half = dim // 2
        self.gather = ops.Gather()
        self.concat = ops.Concat(-1)

    def rotate_half(self, x):
        x1 = x[..., : self.half]                                          # (B, nh, S, hd/2)
        x2 = x[..., self.half:]                                           # (B, nh, S, hd/2)
        return self.concat((-x2, x1))                                     # (B, nh, S, hd)

    def construct(self, x, positions):
        cos = ops.expand_dims(self.gather(self.cos, positions, 0), self.head_axis)  # (B, 1, S, hd) / (B, S, 1, hd)
        sin = ops.expand_dims(self.gather(self.sin, positions, 0), self.head_axis)  # (B, 1, S, hd) / (B, S, 1, hd)
        dtype = x.dtype
        x = ops.cast(x, ms.float32)
        return ops.cast(x * cos + self.rotate_half(x) * sin, dtype)
