"""The tiny MoE case shared by the expert-parallel worker (msrun) and its single-process reference."""
import os
import sys

import numpy as np
from mindspore import nn

from ms_llm.config import ModelConfig, MoEConfig

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers"))
from ptest_common import set_weights  # noqa: E402

WORLD = 4
NUM_EXPERTS = 4


def model_config():
    # capacity factor 1.0 with top-2 of 4 experts over 6 tokens: 3 slots per expert, so some tokens are dropped
    return ModelConfig(arch="gpt", vocab_size=32, hidden_size=8, num_layers=1, num_heads=2, ffn_hidden_size=16,
                       dropout=0.0, moe=MoEConfig(num_experts=NUM_EXPERTS, top_k=2, capacity_factor_train=1.0,
                                                  z_loss_coef=0.01, load_balance_coef=0.1))


class LayerLoss(nn.Cell):
    """(loss, y, aux) with loss = sum(MoE(x) * w) + aux: its gradient reaches every expert slot, the router and
    the input; y and aux ride along (``value_and_grad(..., has_aux=True)``), so one graph gives everything."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def construct(self, x, w):
        y, aux = self.layer(x)
        return (y * w).sum() + aux, y, aux


def build_layer():
    from ms_llm.moe.layer import MoELayer
    layer = MoELayer(model_config())
    layer.set_train(True)
    set_weights(layer, seed=7)
    return layer


def rank_inputs(rank: int):
    """Rank ``rank``'s tokens (2 sequences of 6) and the output weights of its loss."""
    rng = np.random.default_rng(1000 + rank)
    return rng.normal(size=(2, 6, 8)).astype(np.float32), rng.normal(size=(2, 6, 8)).astype(np.float32)
