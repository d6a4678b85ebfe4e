"""Layout enumeration, ranking and the run_plan / format_report / to_dict entry points."""
import json
from types import SimpleNamespace

import pytest

from ms_llm.planner import Layout, ModelShape, format_report, get_device, run_plan, search_layouts
from ms_llm.planner.calibration import megatron_gpt_shape

GPT = megatron_gpt_shape(1024, 24, 16)
MOE = ModelShape(arch="glam", vocab_size=32000, hidden_size=1024, num_layers=8, num_heads=16,
                 ffn_hidden_size=4096, seq_length=1024, num_experts=8, top_k=2, moe_every=2, moe_offset=1,
                 capacity_factor=1.25, max_position_embeddings=1024)


def test_every_ranked_layout_is_feasible_and_sorted():
    a100 = get_device("A100")
    res = search_layouts(GPT, 16, a100, 64)
    assert res.plans and res.evaluated >= len(res.plans)
    times = [p.step_seconds for p in res.plans]
    assert times == sorted(times)
    for p in res.plans:
        L = p.layout
        assert L.dp * L.tp * L.pp == 16
        assert GPT.num_heads % L.tp == 0 and L.tp <= a100.devices_per_node and GPT.num_layers % L.pp == 0
        assert L.dp * L.micro_batch_size * L.num_micro_batches == 64 and L.num_micro_batches >= L.pp
        assert p.memory.total <= p.memory.capacity
    # tp 16 exceeds a node, so no layout has it
    assert all(p.layout.tp <= 8 for p in res.plans)


def test_fixed_options_are_held():
    res = search_layouts(GPT, 16, get_device("A100"), 64, tp=2, recompute="full", optimizer_sharding=True,
                         micro_batch_size=2)
    assert res.plans
    assert {(p.layout.tp, p.layout.recompute, p.layout.optimizer_sharding, p.layout.micro_batch_size)
            for p in res.plans} == {(2, "full", True, 2)}
    with pytest.raises(ValueError, match="do not multiply"):
        search_layouts(GPT, 16, get_device("A100"), 64, dp=3, tp=2, pp=2)


def test_moe_layouts_carve_ep_out_of_dp():
    res = search_layouts(MOE, 16, get_device("910B"), 64)
    eps = {p.layout.ep for p in res.plans}
    assert eps - {1} and all(8 % e == 0 and p.layout.dp % e == 0 for p in res.plans for e in [p.layout.ep])


def test_memory_rejection_is_reported():
    report = run_plan(megatron_gpt_shape(12288, 96, 96), None, 8, 1, "V100")
    assert report.plans == [] and report.feasible == 0
    assert any("exceeds V100 memory" in reason for reason in report.rejected)
    assert "no feasible layout" in format_report(report)


def test_run_plan_from_a_config_object_and_outputs():
    cfg = SimpleNamespace(arch="gpt", vocab_size=51200, hidden_size=1024, num_layers=24, num_heads=16,
                          num_kv_heads=None, ffn_hidden_size=4096, activation="gelu", tie_word_embeddings=True,
                          max_position_embeddings=2048, position_embedding="learned",
                          moe=SimpleNamespace(num_experts=0))
    report = run_plan(cfg, 2048, 64, 16, "910B", top=3, train_tokens=1e10)
    assert len(report.plans) == 3 and report.best is report.plans[0]
    assert report.best.layout.dtype == "bf16"                        # the 910B has a bf16 rate
    text = format_report(report)
    assert "time = data x FLOPs/token" in text and "910B2" in text and report.best.layout.label() in text
    d = report.to_dict()
    json.dumps(d)                                                    # plain JSON types only
    assert d["plans"][0]["step_seconds"] == report.best.step_seconds
    assert d["device"]["sources"]["peak_bf16_tflops"]
    assert run_plan(cfg, 2048, 64, 16, "V100", top=1).best.layout.dtype == "fp16"


def test_run_plan_errors_are_clear():
    with pytest.raises(ValueError, match="unknown device 'H100'"):
        run_plan(GPT, None, 64, 16, "H100")
    with pytest.raises(ValueError, match="seq_length: required"):
        run_plan(SimpleNamespace(arch="gpt"), None, 64, 16, "A100")
    with pytest.raises(ValueError, match="recompute"):
        run_plan(GPT, None, 64, 16, "A100", recompute="partial")
    with pytest.raises(ValueError, match="devices"):
        run_plan(GPT, None, 64, 0, "A100")


def test_explicit_layout_structural_error_names_the_problem():
    from ms_llm.planner import evaluate
    with pytest.raises(ValueError, match="tp=3 does not divide num_heads=16"):
        evaluate(GPT, Layout(dp=1, tp=3), get_device("A100"))
    with pytest.raises(ValueError, match="pp=5 does not divide"):
        evaluate(GPT, Layout(dp=1, pp=5, num_micro_batches=5), get_device("A100"))
    with pytest.raises(ValueError, match="ep=2 on a dense model"):
        evaluate(GPT, Layout(dp=2, ep=2), get_device("A100"))
