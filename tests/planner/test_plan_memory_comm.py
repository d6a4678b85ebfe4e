"""Per-device memory and communication of ms_llm.planner against hand-computed numbers."""
import pytest

from ms_llm.planner import Layout, ModelShape, comm_per_stage, evaluate, get_device, memory_breakdown, param_counts
from ms_llm.planner.costs import layer_specs
from ms_llm.planner.memory import layer_activation_bytes, memory_per_stage

A100 = get_device("A100-80GB")

# GPT with s=2048, h=1024, a=16, 24 layers (GPT-2 medium sizes, Megatron vocab)
GPT = ModelShape(arch="gpt", vocab_size=51200, hidden_size=1024, num_layers=24, num_heads=16,
                 ffn_hidden_size=4096, seq_length=2048, max_position_embeddings=2048)
SBH = 2048 * 1 * 1024


def act(layout, recompute):
    return layer_activation_bytes(GPT, layer_specs(GPT)[0], layout, recompute)


def test_korthikanti_activation_per_layer_hand_numbers():
    # Korthikanti et al. 2022 eqs. (1)-(6), b=1, s=2048, h=1024, a=16: 5as/h = 160
    assert act(Layout(dp=1), "none") == 2097152 * (34 + 160) == 406_847_488
    tp2 = Layout(dp=1, tp=2)
    assert act(tp2, "none") == 2097152 * (10 + 12 + 80) == 213_909_504        # sbh(10 + 24/t + 5as/(ht))
    assert act(Layout(dp=1, tp=2, sequence_parallel=True), "none") == 2097152 * 194 / 2 == 203_423_744
    assert act(tp2, "selective") == 2097152 * (10 + 12) == 46_137_344           # sbh(10 + 24/t)
    assert act(Layout(dp=1, tp=2, sequence_parallel=True), "selective") == 2097152 * 34 / 2
    assert act(tp2, "full") == 2 * SBH == 4_194_304                              # layer input only
    assert act(Layout(dp=1, tp=2, sequence_parallel=True), "full") == SBH
    assert act(Layout(dp=1, micro_batch_size=4), "none") == 4 * 406_847_488


def test_model_states_16_bytes_per_parameter_and_zero1():
    P = param_counts(GPT).total
    m = memory_breakdown(GPT, Layout(dp=1, recompute="none", dtype="bf16"), A100)
    assert (m.weights, m.gradients, m.optimizer) == (2 * P, 2 * P, 12 * P)
    z = memory_breakdown(GPT, Layout(dp=4, optimizer_sharding=True, dtype="bf16"), A100)
    assert z.optimizer == pytest.approx(12 * P / 4)
    f32 = memory_breakdown(GPT, Layout(dp=1, dtype="fp32"), A100)
    assert (f32.weights, f32.gradients, f32.optimizer) == (4 * P, 4 * P, 8 * P)
    # activations: 24 layers x one micro-batch, plus fp32 logits 4 s b V
    assert m.activations == 24 * 406_847_488
    assert m.logits == 4 * 2048 * 51200
    assert m.total == 16 * P + 24 * 406_847_488 + 4 * 2048 * 51200


def test_pipeline_1f1b_keeps_p_micro_batches_on_the_first_stage():
    L = Layout(dp=1, tp=1, pp=4, num_micro_batches=8, recompute="full")
    stages = memory_per_stage(GPT, L, A100)
    assert [st.inflight_micro_batches for st in stages] == [4, 3, 2, 1]
    m = stages[0]
    assert m.activations == 4 * 6 * 2 * SBH                          # p micro-batches x 6 layers x 2sbh
    assert m.recompute_working == 406_847_488                        # one layer re-materialised
    # stage 0 holds 6 layers, the word and position embeddings (tied: the last stage holds a copy)
    pc_layer = 12 * 1024 * 1024 + 13 * 1024
    assert m.params == 6 * pc_layer + 51200 * 1024 + 2048 * 1024
    # the last stage: 1 micro-batch, the fp32 logits 4 s b V and the tied-embedding copy
    last = stages[-1]
    assert last.logits == 4 * 2048 * 51200 and last.activations == 6 * 2 * SBH
    assert last.params == 6 * pc_layer + 51200 * 1024 + 2 * 1024
    assert memory_breakdown(GPT, L, A100) == max(stages, key=lambda st: st.total)


def test_memory_reserve_and_fit():
    m = memory_breakdown(GPT, Layout(dp=1), A100, memory_reserve=0.1)
    assert m.capacity == pytest.approx(80 * 2 ** 30 * 0.9)
    assert m.fits == (m.total <= m.capacity)
    with pytest.raises(ValueError, match="memory_reserve"):
        memory_breakdown(GPT, Layout(dp=1), A100, memory_reserve=1.5)


def test_tensor_parallel_allreduce_volume_and_time():
    # 4 all-reduces of s*b*h*2 bytes per layer per micro-batch (2 fwd + 2 bwd), ring 2(t-1)/t
    L = Layout(dp=1, tp=2, num_micro_batches=4, dtype="bf16")
    tp = comm_per_stage(GPT, L, A100)[0]["tp"]
    expected = 4 * (4 * 24) * (2 * 1 / 2) * SBH * 2
    assert tp.bytes_per_step == expected == 1_610_612_736
    assert tp.seconds_per_step == pytest.approx(expected / 300e9)
    assert tp.link == "intra-node"
    full = comm_per_stage(GPT, Layout(dp=1, tp=2, num_micro_batches=4, recompute="full"), A100)[0]["tp"]
    assert full.bytes_per_step == pytest.approx(1.5 * expected)      # recomputed forward repeats 2 of the 4


def test_data_parallel_gradient_allreduce_and_link_choice():
    P = param_counts(GPT).total
    intra = comm_per_stage(GPT, Layout(dp=4), A100)[0]["dp"]
    assert intra.bytes_per_step == pytest.approx(2 * 3 / 4 * P * 2)   # 2(n-1)/n x bf16 gradients
    assert intra.seconds_per_step == pytest.approx(intra.bytes_per_step / 300e9) and intra.link == "intra-node"
    inter = comm_per_stage(GPT, Layout(dp=16), A100)[0]["dp"]         # 16 ranks span two 8-GPU nodes
    assert inter.link == "inter-node"
    assert inter.seconds_per_step == pytest.approx(2 * 15 / 16 * P * 2 / 25e9)
    sharded = comm_per_stage(GPT, Layout(dp=4, optimizer_sharding=True), A100)[0]["dp"]
    assert sharded.bytes_per_step == intra.bytes_per_step           # reduce-scatter + all-gather volume


def test_pipeline_p2p_volume():
    L = Layout(dp=1, tp=2, pp=2, num_micro_batches=8)
    pp = comm_per_stage(GPT, L, A100)[0]["pp"]
    assert pp.bytes_per_step == 8 * 2 * SBH * 2 / 2                   # fwd + bwd, 1/t slice, 8 micro-batches
    assert pp.link == "intra-node" and pp.seconds_per_step == pytest.approx(pp.bytes_per_step / 300e9)


def test_expert_parallel_alltoall_volume():
    moe = ModelShape(arch="glam", vocab_size=1000, hidden_size=256, num_layers=4, num_heads=4,
                     ffn_hidden_size=1024, seq_length=512, num_experts=8, top_k=2, moe_every=1,
                     capacity_factor=1.25)
    L = Layout(dp=4, ep=4, num_micro_batches=2, micro_batch_size=1)
    ep = comm_per_stage(moe, L, A100)[0]["ep"]
    slots = 512 * 1 * 2 * 1.25 * 256 * 2                               # s b k c h bytes
    assert ep.bytes_per_step == pytest.approx(2 * (2 * 2 * 4) * 3 / 4 * slots)  # m x (2+2 a2a x 4 layers)
    assert ep.group_size == 4
    # experts split 4 ways: each device holds 2 of the 8 experts of every layer
    m = memory_breakdown(moe, L, A100)
    expert = 2 * 256 * 1024 + 1024 + 256
    assert m.params == pytest.approx(param_counts(moe).total - 4 * 8 * expert + 4 * 2 * expert)


def test_910a_tensor_parallel_beyond_the_hccs_group_uses_pcie():
    d = get_device("910A")
    assert comm_per_stage(GPT, Layout(dp=1, tp=4, dtype="fp16"), d)[0]["tp"].link == "intra-node"
    c8 = comm_per_stage(GPT, Layout(dp=1, tp=8, dtype="fp16"), d)[0]["tp"]
    assert c8.link == "intra-node (cross-group)" and c8.bandwidth_gbs == 32


def test_step_time_factorises_into_the_reported_efficiency():
    for L in (Layout(dp=2, tp=2, pp=2, num_micro_batches=8, recompute="full"),
              Layout(dp=8, micro_batch_size=2, num_micro_batches=2, optimizer_sharding=True),
              Layout(dp=1, tp=8, pp=4, num_micro_batches=4, recompute="selective")):
        p = evaluate(GPT, L, A100, train_tokens=1e9)
        f = p.factors
        assert f.bubble == pytest.approx(L.num_micro_batches / (L.num_micro_batches + L.pp - 1))
        assert f.bubble_fraction == pytest.approx((L.pp - 1) / L.num_micro_batches)
        assert p.step_seconds == pytest.approx(p.flops.hardware / (p.peak_flops * L.devices * f.total), rel=1e-9)
        assert p.train_seconds == pytest.approx(1e9 / p.flops.tokens * p.step_seconds, rel=1e-12)
        assert p.achieved_tflops * 1e12 == pytest.approx(p.peak_flops * f.total, rel=1e-9)
        assert "time = data x FLOPs/token" in p.training_time_formula()


def test_single_device_step_is_compute_plus_optimizer():
    L = Layout(dp=1, num_micro_batches=2)
    p = evaluate(GPT, L, A100)
    compute = p.flops.hardware / (312e12 * A100.matmul_efficiency)
    P = param_counts(GPT).total
    adam = P * (24 + 2 + 2) / 2039e9                                  # HBM-bound Adam update
    assert p.step_seconds == pytest.approx(compute + adam, rel=1e-9)
    assert p.factors.communication == 1.0 and p.factors.bubble == 1.0
