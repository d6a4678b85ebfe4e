"""Tiny data-parallel training case shared by the msrun worker and its single-process reference.

Two causal LMs (a one-layer GPT, and a one-layer GLaM whose feed-forward is a top-2 MoE) train for STEPS AdamW
updates with the trainer's TrainStep; a distributed run reduces the accumulated gradients with BufferReducer between the
accumulation and the update, and each rank feeds its half of the global batch.
"""
import os
import sys

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from ms_llm.config import ModelConfig, MoEConfig, TrainConfig
from ms_llm.training.losses import cross_entropy

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers"))
from ptest_common import set_weights  # noqa: E402

KINDS = ("gpt", "moe")
STEPS = 3
BATCH, SEQ, VOCAB = 4, 8, 32
LR = 1e-2
TRAIN = TrainConfig(batch_size=BATCH, grad_clip=1.0, weight_decay=0.01, lr=LR)


def model_config(kind):
    # one layer keeps the compiled graphs (and each msrun worker's compile time) small; the MoE model's layer is MoE
    moe = MoEConfig(num_experts=4, top_k=2, moe_every=1, moe_offset=0, capacity_factor_train=1.0) \
        if kind == "moe" else MoEConfig()
    return ModelConfig(arch="glam" if kind == "moe" else "gpt", vocab_size=VOCAB, hidden_size=16, num_layers=1,
                       num_heads=2, ffn_hidden_size=32, max_position_embeddings=SEQ, dropout=0.0, moe=moe)


def build_model(kind):
    if kind == "gpt":
        from ms_llm.models.gpt import GPTLMHeadModel
        return GPTLMHeadModel(model_config(kind))
    from ms_llm.models.glam import GLaM
    return GLaM(model_config(kind))


class CausalLMLoss(nn.Cell):
    """Mean next-token cross entropy (+ the MoE auxiliary loss)."""

    def __init__(self, model, has_aux):
        super().__init__()
        self.model = model
        self.has_aux = has_aux

    def construct(self, ids, labels):
        out = self.model(ids)
        logits = out[0] if self.has_aux else out
        b, s, v = logits.shape
        loss = cross_entropy(ops.reshape(logits, (b * s, v)), ops.reshape(labels, (b * s,)),
                             ops.ones((b * s,), logits.dtype))
        if self.has_aux:
            loss = loss + out[1]
        return loss


def global_batch(step):
    rng = np.random.default_rng(500 + step)
    ids = rng.integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32)
    return ids, np.roll(ids, -1, axis=1)


def train(kind, info=None, seed=11):
    """Train ``kind`` for STEPS updates; ``info`` (ParallelInfo) makes it data-parallel. Returns (initial weights,
    final weights, losses), weights by name inside the model. Every rank initialises from ``seed + rank``;
    broadcast_parameters makes rank 0's weights win."""
    from ms_llm.parallel.data_parallel import BufferReducer, broadcast_parameters
    from ms_llm.training.step import TrainStep
    model = build_model(kind)
    initial = set_weights(model, seed + (info.rank if info else 0), std=0.1)
    params = model.trainable_params()
    step = TrainStep(CausalLMLoss(model, kind == "moe"), params, TRAIN, dynamic_scale=False)
    reducer = None
    if info is not None:
        broadcast_parameters(model, info)
        reducer = BufferReducer(step.accum, params, info)
    losses = []
    for i in range(STEPS):
        batch = global_batch(i)
        if info is not None:
            batch = info.local_batch(batch)
        losses.append(float(step.accumulate(*[Tensor(a) for a in batch]).asnumpy()))
        if reducer is not None:
            reducer()
        step.apply(Tensor(LR, ms.float32))
    return initial, {n: p.asnumpy() for n, p in model.parameters_and_names() if p.requires_grad}, losses
