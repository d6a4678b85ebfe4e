"""E expert feed-forwards computed as one batched matmul over an expert axis (no Python loop over experts)."""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from ..layers.common import const_param, dropout, ms_dtype, normal_param
from ..layers.mlp import GATE_OF, Activation


class Experts(nn.Cell):
    """Expert i maps x (N, H) to W_out_i act(W_in_i x) (or, gated, W_out_i (act(W_gate_i x) * W_in_i x)).

    Weights are stacked along a leading expert axis: w_in / w_gate (E, H, F), w_out (E, F, H), optional biases
    b_in (E, 1, F) and b_out (E, 1, H); ``construct`` takes (E, N, H) and returns float32 (E, N, H). The expert
    axis is the logical axis ``expert`` in :meth:`shard`, so expert parallelism splits weights and tokens alike.
    """

    def __init__(self, num_experts: int, hidden: int, ffn_hidden: int, activation: str, has_bias: bool = False,
                 dropout_rate: float = 0.0, init_std: float = 0.02, out_init_std: float | None = None,
                 compute_dtype: str = "float32"):
        super().__init__()
        self.num_experts = num_experts
        self.hidden = hidden
        self.ffn_hidden = ffn_hidden
        self.gated = activation in GATE_OF
        self.has_bias = has_bias
        self.act = Activation(GATE_OF.get(activation, activation))
        out_std = init_std if out_init_std is None else out_init_std
        self.w_in = normal_param((num_experts, hidden, ffn_hidden), init_std, "w_in")
        self.w_gate = normal_param((num_experts, hidden, ffn_hidden), init_std, "w_gate") if self.gated else None
        self.w_out = normal_param((num_experts, ffn_hidden, hidden), out_std, "w_out")
        self.b_in = const_param((num_experts, 1, ffn_hidden), 0.0, "b_in") if has_bias else None
        self.b_out = const_param((num_experts, 1, hidden), 0.0, "b_out") if has_bias else None
        self.compute_dtype = ms_dtype(compute_dtype)
        self.bmm_in = ops.BatchMatMul()
        self.bmm_gate = ops.BatchMatMul()
        self.bmm_out = ops.BatchMatMul()
        self.dropout = dropout(dropout_rate)
        self.cast = ops.Cast()

    def construct(self, x):
        """x (E, N, H) -> (E, N, H) float32."""
        x = self.cast(x, self.compute_dtype)
        h = self.cast(self.bmm_in(x, self.cast(self.w_in, self.compute_dtype)), ms.float32)      # (E, N, F)
        if self.has_bias:
            h = h + self.b_in
        if self.gated:
            gate = self.cast(self.bmm_gate(x, self.cast(self.w_gate, self.compute_dtype)), ms.float32)  # (E, N, F)
            h = self.act(gate) * h
        else:
            h = self.act(h)
        h = self.cast(self.dropout(h), self.compute_dtype)
        y = self.cast(self.bmm_out(h, self.cast(self.w_out, self.compute_dtype)), ms.float32)    # (E, N, H)
        if self.has_bias:
            y = y + self.b_out
        return y

    def param_axes(self):
        """Logical axes of this cell's parameters (for strategy files and checkpoint re-sharding)."""
        axes = {"w_in": ("expert", "embed", "mlp"), "w_out": ("expert", "mlp", "embed")}
        if self.gated:
            axes["w_gate"] = ("expert", "embed", "mlp")
        if self.has_bias:
            axes.update(b_in=("expert", None, "mlp"), b_out=("expert", None, "embed"))
        return axes

    def shard(self, sharder):
        x_axes = ("expert", "capacity", "embed")
        sharder.shard(self.bmm_in, "bmm_in", x_axes, ("expert", "embed", "mlp"))
        if self.gated:
            sharder.shard(self.bmm_gate, "bmm_gate", x_axes, ("expert", "embed", "mlp"))
        sharder.shard(self.bmm_out, "bmm_out", ("expert", "capacity", "mlp"), ("expert", "mlp", "embed"))
