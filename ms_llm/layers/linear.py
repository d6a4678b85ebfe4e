"""Linear projection with logical axes on its weight (``(out, in)`` layout, like torch.nn.Linear / nn.Dense)."""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import nn, ops

from .common import const_param, ms_dtype, normal_param


class Linear(nn.Cell):
    """y = x W^T + b over the last axis of x, with W of shape (out_features, in_features).

    ``in_axis`` / ``out_axis`` name the logical axes of the weight, e.g. a column-parallel projection is
    ('embed' -> 'heads') and a row-parallel one ('heads' -> 'embed').
    """

    def __init__(self, in_features: int, out_features: int, in_axis: str = "embed", out_axis: str = "mlp",
                 has_bias: bool = True, init_std: float = 0.02, compute_dtype: str = "float32",
                 out_dtype=ms.float32):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.in_axis = in_axis
        self.out_axis = out_axis
        self.has_bias = has_bias
        self.weight = normal_param((out_features, in_features), init_std, "weight")
        self.bias = const_param((out_features,), 0.0, "bias") if has_bias else None
        self.compute_dtype = ms_dtype(compute_dtype)
        self.out_dtype = out_dtype
        self.matmul = ops.MatMul(transpose_b=True)
        self.bias_add = ops.Add()
        self.cast = ops.Cast()

    def construct(self, x):
        lead = x.shape[:-1]
        x2 = ops.reshape(x, (-1, self.in_features))                    # (N, in)
        y = self.matmul(self.cast(x2, self.compute_dtype), self.cast(self.weight, self.compute_dtype))  # (N, out)
        y = self.cast(y, self.out_dtype)
        if self.has_bias:
            y = self.bias_add(y, self.cast(self.bias, self.out_dtype))
        return ops.reshape(y, lead + (self.out_features,))            # (..., out)

    def param_axes(self):
        """Logical axes of this cell's parameters (for strategy files and checkpoint re-sharding)."""
        axes = {"weight": (self.out_axis, self.in_axis)}
        if self.has_bias:
            axes["bias"] = (self.out_axis,)
        return axes

    def shard(self, sharder):
        sharder.shard(self.matmul, "matmul", ("batch", self.in_axis), (self.out_axis, self.in_axis))
        if self.has_bias:
            sharder.shard(self.bias_add, "bias_add", ("batch", self.out_axis), (self.out_axis,))
