"""Parameter counts and FLOPs of ms_llm.planner against published counts and hand transcriptions."""
from types import SimpleNamespace

import pytest

from ms_llm.planner import ModelShape, forward_flops_per_token, megatron_gpt_flops, param_counts, step_flops
from ms_llm.planner.calibration import llama2_7b_shape, megatron_gpt_shape

# Brown et al. 2020, Table 2.1: (name, n_layers, d_model, n_heads, n_params); vocab 50257, context 2048.
GPT3_FAMILY = [
    ("125M", 12, 768, 12, 125e6), ("350M", 24, 1024, 16, 350e6), ("760M", 24, 1536, 16, 760e6),
    ("1.3B", 24, 2048, 24, 1.3e9), ("2.7B", 32, 2560, 32, 2.7e9), ("6.7B", 32, 4096, 32, 6.7e9),
    ("13B", 40, 5140, 40, 13.0e9), ("175B", 96, 12288, 96, 175.0e9),
]


def gpt3(layers, hidden, heads, seq=2048):
    # Brown et al.'s counts match attention projections of width d_model (12 l d^2 + embeddings). For 1.3B
    # (2048/24) and 13B (5140/40) d_model is not a multiple of n_heads, so the head width is rounded down
    # (85 and 128): attention width 2040 / 5120, within 0.4% of d_model.
    head_dim = None if hidden % heads == 0 else hidden // heads
    return ModelShape(arch="gpt", vocab_size=50257, hidden_size=hidden, num_layers=layers, num_heads=heads,
                      ffn_hidden_size=4 * hidden, seq_length=seq, head_dim=head_dim, max_position_embeddings=2048)


@pytest.mark.parametrize("name,layers,hidden,heads,published", GPT3_FAMILY)
def test_gpt3_family_parameter_counts_within_3_percent(name, layers, hidden, heads, published):
    total = param_counts(gpt3(layers, hidden, heads)).total
    assert abs(total / published - 1) <= 0.03, (name, total)


def test_bert_base_count_matches_bertmodel_exactly():
    # BertModel (embeddings + 12 layers + pooler) of bert-base-uncased: 109,482,240 parameters
    shape = ModelShape(arch="bert", vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12,
                       ffn_hidden_size=3072, seq_length=512, max_position_embeddings=512, type_vocab_size=2,
                       pre_norm=False)
    pc = param_counts(shape)
    assert pc.total - pc.bert_pretraining_heads == 109_482_240
    # pre-training heads: MLM transform 768*768+768, its LayerNorm 1536, output bias 30522; NSP 768*2+2
    assert pc.bert_pretraining_heads == 768 * 768 + 768 + 1536 + 30522 + 768 * 2 + 2


def test_llama2_counts_gated_untied_and_grouped_query():
    # Llama-2-7b / -70b parameter counts of the released checkpoints: 6,738,415,616 and 68,976,648,192
    assert param_counts(llama2_7b_shape()).total == 6_738_415_616
    s70 = llama2_7b_shape().replace(hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8,
                                    ffn_hidden_size=28672)
    assert param_counts(s70).total == 68_976_648_192


def test_encoder_decoder_hand_count():
    # transformer base-like, tiny: h 8, 2 heads, ffn 16, vocab 10, 1 enc + 1 dec layer, post-norm, tied,
    # sinusoidal positions, biases and LayerNorm with bias.
    s = ModelShape(arch="transformer", vocab_size=10, hidden_size=8, num_layers=1, num_decoder_layers=1,
                   num_heads=2, ffn_hidden_size=16, seq_length=4, position_embedding="sinusoidal",
                   pre_norm=False)
    attn = 4 * 8 * 8 + 4 * 8            # Wq Wk Wv Wo + biases
    ffn = 2 * 8 * 16 + 16 + 8
    ln = 2 * 8
    enc = attn + ffn + 2 * ln
    dec = 2 * attn + ffn + 3 * ln
    assert param_counts(s).total == 10 * 8 + enc + dec


def test_moe_total_and_activated_hand_count():
    # 2 layers, MoE in layer 1 (moe_every 2, offset 1), 4 experts, top-2, no biases, RMSNorm, untied
    s = ModelShape(arch="glam", vocab_size=16, hidden_size=8, num_layers=2, num_heads=2, ffn_hidden_size=32,
                   seq_length=4, position_embedding="rotary", use_bias=False, norm="rmsnorm",
                   tie_word_embeddings=False, num_experts=4, top_k=2, moe_every=2, moe_offset=1)
    attn, ffn, norm = 4 * 8 * 8, 2 * 8 * 32, 8
    dense_layer = attn + ffn + 2 * norm
    moe_layer = attn + 4 * ffn + 8 * 4 + 2 * norm     # experts + router
    pc = param_counts(s)
    assert pc.total == 16 * 8 + dense_layer + moe_layer + norm + 16 * 8
    assert pc.experts == 4 * ffn
    assert pc.activated == pc.total - 2 * ffn        # a token passes 2 of the 4 experts


def test_switch_base_128_published_size():
    # Fedus et al. 2022 (Switch Transformers) Table 9: Switch-Base, 128 experts, 7.4B parameters, with the
    # FLOPs of T5-Base (223M). T5 v1.0 base sizes, relative positions, no biases, scale-only RMSNorm, MoE
    # in every other FFN of encoder and decoder.
    s = ModelShape(arch="switch", vocab_size=32128, hidden_size=768, num_layers=12, num_decoder_layers=12,
                   num_heads=12, ffn_hidden_size=3072, seq_length=512, position_embedding="relative",
                   use_bias=False, norm="rmsnorm", norm_bias=False, num_experts=128, top_k=1, moe_every=2,
                   moe_offset=1)
    pc = param_counts(s)
    assert abs(pc.total / 7.4e9 - 1) <= 0.03
    assert abs(pc.activated / 223e6 - 1) <= 0.03


def test_gpt_full_recompute_flops_equal_megatron_formula():
    for hidden, layers, heads in ((12288, 96, 96), (2304, 24, 24), (1024, 24, 16)):
        shape = megatron_gpt_shape(hidden, layers, heads)
        ours = step_flops(shape, 1536, "full").hardware
        assert ours == pytest.approx(megatron_gpt_flops(1536, 2048, layers, hidden, 51200), rel=1e-12)


def test_backward_is_twice_forward_and_recompute_extras():
    shape = megatron_gpt_shape(1024, 24, 16)
    s, h, l, V = 2048, 1024, 24, 51200
    f = step_flops(shape, 8, "none")
    tokens = 8 * s
    layer_fwd = (24 * h * h + 4 * s * h) * l       # per token
    assert f.forward == pytest.approx(tokens * (layer_fwd + 2 * h * V), rel=1e-12)
    assert f.backward == pytest.approx(2 * f.forward, rel=1e-12)
    assert f.hardware == f.model == pytest.approx(3 * f.forward, rel=1e-12)
    assert step_flops(shape, 8, "selective").recompute == pytest.approx(tokens * 4 * s * h * l, rel=1e-12)
    assert step_flops(shape, 8, "full").recompute == pytest.approx(tokens * layer_fwd, rel=1e-12)


def test_six_n_d_approximation_is_close_for_large_gpt_and_reported():
    # 6ND misses the attention-score FLOPs 12 s h l and counts embeddings; for GPT-3 175B it is within 5%
    f = step_flops(megatron_gpt_shape(12288, 96, 96), 1536, "none")
    assert f.approx_6nd == pytest.approx(6 * param_counts(megatron_gpt_shape(12288, 96, 96)).activated * f.tokens)
    assert abs(f.model / f.approx_6nd - 1) < 0.05


def test_moe_flops_scale_with_top_k_and_capacity():
    base = ModelShape(arch="glam", vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, ffn_hidden_size=64,
                      seq_length=8, num_experts=4, top_k=1, moe_every=1, capacity_factor=1.0, use_bias=False)
    expert_fwd = 2 * 2 * 16 * 64                   # two matrices, per routed slot
    f1 = forward_flops_per_token(base)["layers"]
    f2 = forward_flops_per_token(base.replace(top_k=2))["layers"]
    f3 = forward_flops_per_token(base.replace(capacity_factor=1.25))["layers"]
    assert f2 - f1 == pytest.approx(2 * expert_fwd)          # one more slot in each of the 2 layers
    assert f3 - f1 == pytest.approx(2 * 0.25 * expert_fwd)


def test_from_config_duck_typed_and_real_config():
    ns = SimpleNamespace(arch="switch", vocab_size=100, hidden_size=32, num_layers=2, num_decoder_layers=None,
                         num_heads=4, num_kv_heads=None, ffn_hidden_size=64, activation="geglu",
                         tie_word_embeddings=True, max_position_embeddings=64, position_embedding="relative",
                         moe=SimpleNamespace(num_experts=8, top_k=1, moe_every=2, capacity_factor_train=1.25))
    s = ModelShape.from_config(ns, 32)
    assert (s.num_decoder_layers, s.gated_ffn, s.num_experts, s.capacity_factor, s.moe_every) == (2, True, 8, 1.25, 2)
    with pytest.raises(ValueError, match="missing attribute 'hidden_size'"):
        ModelShape.from_config(SimpleNamespace(arch="gpt", vocab_size=8), 8)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ModelShape.from_config(SimpleNamespace(**{**vars(ns), "arch": "gpt", "position_embedding": "learned",
                                                  "moe": None}), 128)

    from ms_llm.config import ModelConfig, MoEConfig
    cfg = ModelConfig(arch="glam", vocab_size=512, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                      ffn_hidden_size=128, activation="swiglu", norm="rmsnorm", use_bias=False,
                      max_position_embeddings=128, position_embedding="rotary",
                      moe=MoEConfig(num_experts=4, top_k=2, moe_every=2, moe_offset=1))
    s = ModelShape.from_config(cfg, 128)
    assert (s.kv_heads, s.gated_ffn, s.norm, s.use_bias, s.top_k, s.moe_offset) == (2, True, "rmsnorm", False, 2, 1)
    assert [s.is_moe_layer(i) for i in range(4)] == [cfg.moe.is_moe_layer(i) for i in range(4)]


def test_shape_validation_names_the_field():
    with pytest.raises(ValueError, match="ModelShape.num_decoder_layers"):
        ModelShape(arch="transformer", vocab_size=8, hidden_size=8, num_layers=1, num_heads=2,
                   ffn_hidden_size=8, seq_length=4)
    with pytest.raises(ValueError, match="ModelShape.hidden_size"):
        ModelShape(arch="gpt", vocab_size=8, hidden_size=10, num_layers=1, num_heads=4, ffn_hidden_size=8,
                   seq_length=4)
    with pytest.raises(ValueError, match="ModelShape.top_k"):
        ModelShape(arch="glam", vocab_size=8, hidden_size=8, num_layers=1, num_heads=2, ffn_hidden_size=8,
                   seq_length=4, num_experts=2, top_k=3)
