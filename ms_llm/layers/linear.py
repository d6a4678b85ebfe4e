"""Linear projection with logical axes on its weight (``(out, in)`` layout, like torch.nn.Linear / nn.Dense)."""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import nn, ops

from ..kernels.blas_linear import BlasLinearProduct
from .common import const_param, ms_dtype, normal_param


# MindSpore 2.10's CPU MatMul of (M, K) x (N, K)^T with 4 <= M <= 32 rows (decode steps of batch 4-32) is ~1.3-1.6x
# slower than the same product computed as (W x^T)^T; from M = 64 on the direct form is as fast or faster, below 4
# it is faster (12 GPT-3 Small layers of projections at batch 1 / 4 / 8 / 16 / 256: 13.1 / 28.9 / 38.0 / 39.7 / 191
# ms direct, 20.3 / 25.0 / 27.5 / 24.5 / 226 ms swapped, one process, interleaved). Inference on CPU takes the swapped
# form in that range; training graphs and other devices keep the direct one.
SWAP_ROWS = (4, 32)
# On CPU, float32 products of at least this many rows (training steps, prefill) run through OpenBLAS
# (ms_llm.kernels.blas_linear): MindSpore's CPU MatMul runs the backward's layouts at 69-109 GFLOPS at BERT-base
# shapes, OpenBLAS every layout at ~190-220. Smaller (decode-sized) products keep MindSpore's MatMul / the swap above.
BLAS_MIN_ROWS = SWAP_ROWS[1] + 1


def blas_product(compute_dtype) -> BlasLinearProduct | None:
    """The OpenBLAS product cell for float32 products on CPU; None elsewhere (other dtypes, Ascend)."""
    if ms.get_context("device_target") == "CPU" and compute_dtype == ms.float32:
        return BlasLinearProduct()
    return None


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
        self.matmul_swapped = ops.MatMul(transpose_b=True)            # W (out, in) @ x (N, in)^T: see SWAP_ROWS
        self.swap_small_rows = ms.get_context("device_target") == "CPU"
        self.blas = blas_product(self.compute_dtype)
        self.bias_add = ops.Add()
        self.cast = ops.Cast()

    def swapped(self, rows: int) -> bool:
        """Whether a product over ``rows`` rows runs as (W x^T)^T (a compile-time choice: shapes are static)."""
        return self.swap_small_rows and not self.training and SWAP_ROWS[0] <= rows <= SWAP_ROWS[1]

    def construct(self, x):
        return self.linear(x)

    def linear(self, x, product=None):
        """``x W^T + b``; ``product`` (optional, a cell computing ``x2 (N, in) @ w (out, in)^T``, e.g. the decode-time
        GEMV of :mod:`ms_llm.kernels.gemv`) replaces the MatMul, with the same dtypes and bias."""
        lead = x.shape[:-1]
        x2 = self.cast(ops.reshape(x, (-1, self.in_features)), self.compute_dtype)   # (N, in)
        w = self.cast(self.weight, self.compute_dtype)
        if product is None and self.blas is not None and x2.shape[0] >= BLAS_MIN_ROWS:
            y = self.blas(x2, w, self.bias) if self.has_bias else self.blas(x2, w)   # (N, out), bias added
            return ops.reshape(self.cast(y, self.out_dtype), lead + (self.out_features,))   # (..., out)
        if product is not None:
            y = product(x2, w)                                         # (N, out)
        elif self.swapped(x2.shape[0]):
            y = ops.transpose(self.matmul_swapped(w, x2), (1, 0))      # (out, N) -> (N, out)
        else:
            y = self.matmul(x2, w)                                     # (N, out)
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
