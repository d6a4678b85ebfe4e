"""Pipeline stage assignment (pure function, checked against brute force), stage plans of real models, the
micro-batch wrapper's numerics in stand-alone mode, and recomputation (flags set, numerics unchanged).

Executing a pipeline across stages needs Ascend (MindSpore refuses pipeline_stages > 1 on CPU); building it and
running the micro-batch wrapper on one device works here.
"""
import itertools

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn, ops

from ms_llm.config import ModelConfig, ParallelConfig
from ms_llm.parallel.pipeline import (assign_stages, balance_stages, pipeline_model, plan_stages, stage_sizes,
                                      wrap_pipeline)
from ms_llm.parallel.recompute import apply_recompute, is_recomputed, recompute_targets
from ms_llm.training.losses import cross_entropy


@pytest.mark.parametrize("costs,stages,want", [
    ([1] * 8, 4, [0, 0, 1, 1, 2, 2, 3, 3]),
    ([1] * 10, 4, [0, 0, 1, 1, 2, 2, 2, 3, 3, 3]),      # extra layers go to the later stages
    ([1] * 3, 1, [0, 0, 0]),
    ([3, 1, 1, 1, 1, 1], 2, [0, 0, 1, 1, 1, 1]),         # a heavy first item (embedding) gets fewer layers
    ([1, 1, 1, 1, 1, 4], 3, [0, 0, 1, 1, 1, 2]),         # a heavy last item (output head) sits alone; of the
                                                         # equal splits 3-2-4 / 2-3-4 the later stage gets more
])
def test_balance_stages_examples(costs, stages, want):
    assert balance_stages(costs, stages) == want
    assert stage_sizes(want) == [want.count(s) for s in range(stages)]


def brute_force_max(costs, stages):
    n = len(costs)
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), stages - 1):
        bounds = (0,) + cuts + (n,)
        best = min(best, max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])))
    return best


def test_balance_stages_is_optimal_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(60):
        n = int(rng.integers(2, 9))
        stages = int(rng.integers(1, n + 1))
        costs = [float(c) for c in rng.integers(1, 6, size=n)]
        got = balance_stages(costs, stages)
        assert got == sorted(got) and set(got) == set(range(stages)), got      # contiguous, every stage used
        loads = [sum(c for c, s in zip(costs, got) if s == k) for k in range(stages)]
        assert max(loads) == brute_force_max(costs, stages), (costs, stages, got)


def test_balance_stages_errors():
    with pytest.raises(ValueError, match="3 layers cannot fill 4 pipeline stages"):
        balance_stages([1, 1, 1], 4)
    with pytest.raises(ValueError, match="non-negative"):
        balance_stages([1, -1], 2)


def tiny_gpt(layers=2, **kw):
    from ms_llm.models.gpt import GPTLMHeadModel
    return GPTLMHeadModel(ModelConfig(arch="gpt", vocab_size=32, hidden_size=16, num_layers=layers, num_heads=2,
                                      ffn_hidden_size=32, max_position_embeddings=8, dropout=0.0, **kw))


def test_plan_gpt_and_transformer():
    plan = plan_stages(tiny_gpt(4, tie_word_embeddings=False), 2)
    assert plan == {"": 1, "decoder": 0, "decoder.embed_tokens": 0, "decoder.embed_positions": 0,
                    "decoder.drop": 0, "decoder.blocks": 0, "decoder.blocks.0": 0, "decoder.blocks.1": 0,
                    "decoder.blocks.2": 1, "decoder.blocks.3": 1, "decoder.final_norm": 1, "lm_head": 1,
                    "blas": 1}                          # the tied head's OpenBLAS product (CPU), with the head
    # a heavy output head moves a layer off the last stage
    assert plan_stages(tiny_gpt(4), 2, head_cost=2.0)["decoder.blocks.1"] == 0
    assert plan_stages(tiny_gpt(4), 2, head_cost=2.0)["decoder.blocks.2"] == 0
    from ms_llm.models.transformer import Transformer
    t = Transformer(ModelConfig(arch="transformer", vocab_size=32, hidden_size=16, num_layers=2, num_decoder_layers=2,
                                num_heads=2, ffn_hidden_size=32, max_position_embeddings=8, dropout=0.0))
    plan = plan_stages(t, 2)
    blocks = {k: v for k, v in plan.items() if ".blocks." in k}
    assert blocks == {"encoder.blocks.0": 0, "encoder.blocks.1": 0, "decoder.blocks.0": 1, "decoder.blocks.1": 1}
    assert plan["encoder.final_norm"] == 0 and plan["decoder.final_norm"] == 1 and plan[""] == 1
    assert plan["embed_tokens"] == 0


def test_pipeline_model_sets_stages_and_wraps():
    from mindspore.parallel.nn import Pipeline
    from ms_llm.layers.block import shares_graph
    model = tiny_gpt(2)
    assert all(shares_graph(b) for b in model.decoder.blocks)              # dropout 0: one parsed block graph
    loss = LMLoss(model)
    cfg = ParallelConfig(mode="semi_auto_parallel", pipeline_stages=2, micro_batches=4)
    wrapped, plan = pipeline_model(model, loss, cfg)
    assert not any(shares_graph(b) for b in model.decoder.blocks)          # pipelined: parsed layer by layer
    assert isinstance(wrapped.pipeline, Pipeline) and wrapped.pipeline.micro_size == 4
    assert model.decoder.blocks[0].pipeline_stage == 0 and model.decoder.blocks[1].pipeline_stage == 1
    assert model.decoder.final_norm.pipeline_stage == 1 and model.decoder.embed_tokens.pipeline_stage == 0
    with pytest.raises(ValueError, match="does not have"):
        assign_stages(model, {"decoder.nope": 0})
    same, plan1 = pipeline_model(model, loss, ParallelConfig())
    assert same is loss and plan1 == {}


class LMLoss(nn.Cell):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def construct(self, ids, labels):
        logits = self.model(ids)
        b, s, v = logits.shape
        return cross_entropy(ops.reshape(logits, (b * s, v)), ops.reshape(labels, (b * s,)),
                             ops.ones((b * s,), ms.float32))


def loss_and_grads(net, ids, labels):
    loss, grads = ms.value_and_grad(net, None, net.trainable_params())(Tensor(ids), Tensor(labels))
    return float(loss.asnumpy()), [g.asnumpy() for g in grads]


def seeded_gpt():
    model = tiny_gpt(1)     # one layer: four graphs compile in this test
    rng = np.random.default_rng(5)
    for p in sorted(model.trainable_params(), key=lambda q: q.name):
        p.set_data(Tensor(rng.normal(0, 0.2, tuple(p.shape)).astype(np.float32)))
    return model


def test_micro_batch_wrapper_and_recompute_keep_numerics():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 32, (4, 8)).astype(np.int32)
    labels = rng.integers(0, 32, (4, 8)).astype(np.int32)
    ref_loss, ref_grads = loss_and_grads(LMLoss(seeded_gpt()), ids, labels)
    # 2 micro-batches of 2: MindSpore's Pipeline sums their mean losses; the wrapper divides by 2
    pipe_loss, pipe_grads = loss_and_grads(wrap_pipeline(LMLoss(seeded_gpt()), 2), ids, labels)
    assert abs(pipe_loss - ref_loss) < 1e-6
    for a, b in zip(pipe_grads, ref_grads):
        np.testing.assert_allclose(a, b, atol=1e-6)      # float32: the same sums in two halves
    for mode in ("full", "selective"):
        model = seeded_gpt()
        names = apply_recompute(model, mode)
        cells = dict(model.cells_and_names())
        assert names and all(is_recomputed(cells[n]) for n in names)
        assert not is_recomputed(model.decoder.final_norm)
        loss, grads = loss_and_grads(LMLoss(model), ids, labels)
        assert loss == ref_loss
        for a, b in zip(grads, ref_grads):
            np.testing.assert_array_equal(a, b)           # recomputation repeats the same float32 ops


def test_recompute_targets():
    model = tiny_gpt(2)
    assert recompute_targets(model, "none") == []
    assert recompute_targets(model, "full") == ["decoder.blocks.0", "decoder.blocks.1"]
    assert recompute_targets(model, "selective") == ["decoder.blocks.0.self_attn.core",
                                                     "decoder.blocks.1.self_attn.core"]
    with pytest.raises(ValueError, match="unknown mode 'some'"):
        recompute_targets(model, "some")
    with pytest.raises(ValueError, match="has no TransformerBlock"):
        recompute_targets(nn.Dense(2, 2), "full")
