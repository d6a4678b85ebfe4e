"""Hugging Face LlamaForCausalLM (GQA, RoPE, SwiGLU, RMSNorm, untied head) -> ms_llm: logits and greedy generation
against transformers' arrays (tests/references/data/llama_tiny*), exact export round trip, config and weight errors."""
import json
import os

import numpy as np
import pytest
from mindspore import Tensor

from ms_llm.checkpoint import hf_llama
from ms_llm.checkpoint.io import CheckpointMismatchError, load_safetensors

REF = os.path.join(os.path.dirname(__file__), os.pardir, "references", "data")
HF_DIR = os.path.join(REF, "llama_tiny")


@pytest.fixture(scope="module")
def model():
    return hf_llama.from_pretrained(HF_DIR)


@pytest.fixture(scope="module")
def ref():
    return np.load(os.path.join(REF, "llama_tiny.npz"))


def _hf_config():
    with open(os.path.join(HF_DIR, "config.json")) as f:
        return json.load(f)


def test_config_maps_llama_settings(model):
    cfg = model.cfg
    assert (cfg.num_heads, cfg.kv_heads, cfg.dim_per_head, cfg.ffn_hidden_size) == (4, 2, 8, 64)
    assert (cfg.activation, cfg.position_embedding, cfg.norm, cfg.use_bias, cfg.tie_word_embeddings) == \
        ("swiglu", "rotary", "rmsnorm", False, False)
    assert (cfg.rope_theta, cfg.norm_eps, cfg.eos_token_id, cfg.pad_token_id) == (10000.0, 1e-6, 299, 0)


def test_logits_match_transformers(model, ref):
    logits = model(Tensor(ref["input_ids"].astype(np.int32)), Tensor(ref["attention_mask"])).logits.asnumpy()
    real = ref["attention_mask"].astype(bool)
    assert np.abs(logits - ref["logits"])[real].max() < 1e-4               # observed ~7e-6


def test_greedy_generation_matches_transformers(model, ref):
    # one left-padded batch: the 7-token prompt of gen1 and the two 5-token prompts of gen2 (HF generated them
    # unpadded; with positions from the mask's cumsum the padded rows must give the same tokens)
    p1, p2 = ref["gen1_prompt_ids"], ref["gen2_prompt_ids"]
    ids = np.zeros((3, 7), np.int64)
    mask = np.zeros((3, 7), np.int64)
    ids[0], mask[0] = p1[0], 1
    ids[1:, 2:], mask[1:, 2:] = p2, 1
    out = model.generate(ids, max_new_tokens=24, attention_mask=mask, return_dict_in_generate=True,
                         output_logits=True)
    assert out.sequences.shape == (3, 7 + 24)
    assert np.array_equal(out.sequences[0], ref["gen1_output_ids"][0])          # 24 new tokens, token for token
    assert np.array_equal(out.sequences[1:, 2:], ref["gen2_output_ids"])
    # the prefill's last-position logits of prompt 1 are the single-prompt forward's last row
    np.testing.assert_allclose(out.logits[0][0], ref["single_logits"][0, -1], atol=1e-4, rtol=0)


def test_export_round_trips_exactly(model, tmp_path):
    hf_llama.export_pretrained(model, str(tmp_path))
    original, exported = load_safetensors(os.path.join(HF_DIR, "model.safetensors")), \
        load_safetensors(str(tmp_path / "model.safetensors"))
    assert sorted(original) == sorted(exported)
    assert all(np.array_equal(original[k], exported[k]) for k in original)
    with open(tmp_path / "config.json") as f:
        assert hf_llama.hf_to_model_config(json.load(f)) == model.cfg


def test_transformers_4_rope_theta_and_buffers(model):
    cfg = _hf_config()
    del cfg["rope_parameters"]
    cfg["rope_theta"] = 500000.0
    assert hf_llama.hf_to_model_config(cfg).rope_theta == 500000.0
    w = load_safetensors(os.path.join(HF_DIR, "model.safetensors"))
    w["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)   # old checkpoints' buffer
    from ms_llm.models.gpt import GPTLMHeadModel
    hf_llama.load_into(GPTLMHeadModel(model.cfg), w)


def test_weight_errors_and_foreign_heads(model):
    from ms_llm.models.gpt import GPTLMHeadModel
    w = load_safetensors(os.path.join(HF_DIR, "model.safetensors"))
    del w["lm_head.weight"]
    w["model.layers.0.self_attn.k_proj.weight"] = np.zeros((32, 32), np.float32)   # MHA-shaped, not GQA
    with pytest.raises(CheckpointMismatchError) as e:
        hf_llama.load_into(GPTLMHeadModel(model.cfg), w)
    assert e.value.missing == ["lm_head.weight"]
    assert e.value.mismatched == [("model.layers.0.self_attn.k_proj.weight", (32, 32), (16, 32))]
    w = load_safetensors(os.path.join(HF_DIR, "model.safetensors"))
    w["score.weight"] = np.zeros((2, 32), np.float32)
    with pytest.warns(UserWarning, match="score.weight"):
        hf_llama.load_into(GPTLMHeadModel(model.cfg), w)


@pytest.mark.parametrize("change,match", [
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "rope_type"),
    ({"hidden_act": "tanh"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
])
def test_unsupported_configs_are_named(change, match):
    cfg = _hf_config()
    cfg.update(change)
    with pytest.raises(ValueError, match=match):
        hf_llama.hf_to_model_config(cfg)
