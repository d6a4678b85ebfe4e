"""Graph reuse of identical transformer blocks (``mindspore.lazy_inline(policy="front")``): same loss and gradients
as separately parsed blocks; with our fused dropout (CPU, float32) every layer of a shared graph still draws its own
masks; never for blocks with MindSpore's random ops (a reused graph would give every layer the first layer's seeds)."""
import dataclasses

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn, ops

from ms_llm.config import ModelConfig
from ms_llm.kernels.dropout import FusedDropout
from ms_llm.layers.block import TransformerBlock, repeats_draws_when_shared, shares_graph, unshare_graph
from ms_llm.models.gpt import GPTLMHeadModel
from ms_llm.moe.layer import MoELayer

GPT = ModelConfig(arch="gpt", vocab_size=61, hidden_size=16, num_layers=4, num_heads=2, ffn_hidden_size=32,
                  max_position_embeddings=16, dropout=0.0, initializer_range=0.3,
                  attention_pattern="alternating_banded", band_width=3)


class WeightedLogits(nn.Cell):
    """A fixed random projection of the logits: a scalar whose gradient reaches every parameter."""

    def __init__(self, model, weights):
        super().__init__()
        self.model = model
        self.weights = Tensor(weights)

    def construct(self, ids, mask, pos):
        return ops.reduce_sum(self.model(ids, mask, pos) * self.weights)   # inside a graph the model returns logits


def loss_and_grads(model, inputs, weights):
    net = WeightedLogits(model, weights)
    params = model.trainable_params()
    loss, grads = ms.value_and_grad(net, None, params)(*inputs)
    return float(loss.asnumpy()), {p.name: g.asnumpy() for p, g in zip(params, grads)}


def test_reused_blocks_give_the_same_loss_and_gradients():
    # one parsed graph for all blocks against each block parsed on its own: the same function of the same weights
    shared = GPTLMHeadModel(GPT)
    separate = GPTLMHeadModel(GPT)
    for b in separate.decoder.blocks:
        unshare_graph(b)
    assert all(shares_graph(b) for b in shared.decoder.blocks)
    assert not any(shares_graph(b) for b in separate.decoder.blocks)
    for m in (shared, separate):
        m.init_weights(3)
        m.set_train(False)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, GPT.vocab_size, (2, 12)).astype(np.int32)
    mask = np.ones((2, 12), np.float32)
    pos = np.tile(np.arange(12, dtype=np.int32), (2, 1))
    inputs = (Tensor(ids), Tensor(mask), Tensor(pos))
    weights = rng.standard_normal((2, 12, GPT.vocab_size)).astype(np.float32)
    loss_a, grads_a = loss_and_grads(shared, inputs, weights)
    loss_b, grads_b = loss_and_grads(separate, inputs, weights)
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert sorted(grads_a) == sorted(grads_b)
    for name in grads_a:      # every layer's parameters get their own gradient (fp32; same ops in the same order)
        np.testing.assert_allclose(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # the layers really differ (a reused graph must not tie their weights)
    assert not np.allclose(grads_a["model.decoder.blocks.0.ffn.fc_in.weight"],
                       grads_a["model.decoder.blocks.2.ffn.fc_in.weight"])


def has_fused_dropout(cell):
    return any(isinstance(c, FusedDropout) for _, c in cell.cells_and_names())


class SameInputTwice(nn.Cell):
    """Two blocks applied to the same input in one graph (their outputs differ only by their dropout masks)."""

    def __init__(self, a, b):
        super().__init__()
        self.a = a
        self.b = b

    def construct(self, x, key_mask, positions):
        return self.a(x, key_mask, positions)[0], self.b(x, key_mask, positions)[0]


def test_shared_blocks_with_fused_dropout_draw_their_own_masks():
    cfg = dataclasses.replace(GPT, dropout=0.5)
    ms.set_seed(5)
    a, b = TransformerBlock(cfg, causal=True), TransformerBlock(cfg, causal=True)
    assert shares_graph(a) and shares_graph(b) and has_fused_dropout(a)   # fused dropout, float32, CPU
    for src, dst in zip(a.trainable_params(), b.trainable_params()):
        dst.set_data(src.data)
    net = SameInputTwice(a, b)
    x = Tensor(np.random.default_rng(1).normal(size=(2, 12, GPT.hidden_size)).astype(np.float32))
    key_mask = Tensor(np.ones((2, 12), np.float32))
    positions = Tensor(np.tile(np.arange(12, dtype=np.int32), (2, 1)))
    net.set_train(False)
    ya, yb = (t.asnumpy() for t in net(x, key_mask, positions))
    np.testing.assert_array_equal(ya, yb)                                   # same weights, same function
    net.set_train(True)
    ya, yb = (t.asnumpy() for t in net(x, key_mask, positions))
    ya2, _ = (t.asnumpy() for t in net(x, key_mask, positions))
    assert not np.allclose(ya, yb, atol=1e-3)                               # each layer its own masks ...
    assert not np.allclose(ya, ya2, atol=1e-3)                              # ... and each step


def test_blocks_that_repeat_random_numbers_do_not_share_a_graph():
    dense = TransformerBlock(GPT, causal=True)
    assert shares_graph(dense) and not has_fused_dropout(dense) and not repeats_draws_when_shared(dense, True)
    assert not repeats_draws_when_shared(FusedDropout(0.1, seed=1), float32=True)       # per-call draws on CPU
    assert repeats_draws_when_shared(FusedDropout(0.1, seed=1), float32=False)          # MindSpore's fallback
    assert repeats_draws_when_shared(nn.Dropout(p=0.1), float32=True)
    # float16 compute: the fused dropout would fall back to MindSpore's Dropout
    half = TransformerBlock(dataclasses.replace(GPT, dropout=0.1, compute_dtype="float16"), causal=True)
    assert has_fused_dropout(half) and not shares_graph(half)
    # Shazeer et al.'s noisy top-k gating samples noise in training: an MoE block is built without reuse
    moe_cfg = dataclasses.replace(GPT, moe=dataclasses.replace(GPT.moe, num_experts=4, top_k=2, router="noisy_topk"))
    moe = MoELayer(moe_cfg)
    assert repeats_draws_when_shared(moe, float32=True)
    assert not shares_graph(TransformerBlock(moe_cfg, causal=True, ffn=moe, ffn_returns_aux=True))
