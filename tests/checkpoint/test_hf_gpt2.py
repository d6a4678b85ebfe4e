"""Hugging Face GPT2LMHeadModel -> ms_llm: logits and greedy generation against transformers' arrays
(tests/references/data/gpt2_tiny*, made by tests/references/make_references.py), exact export round trip, and the
errors / warnings for missing, unexpected, mis-shaped and foreign weights."""
import json
import os

import numpy as np
import pytest
from mindspore import Tensor

from ms_llm.checkpoint import hf_gpt2
from ms_llm.checkpoint.io import CheckpointMismatchError, load_safetensors, save_safetensors

REF = os.path.join(os.path.dirname(__file__), os.pardir, "references", "data")
HF_DIR = os.path.join(REF, "gpt2_tiny")


@pytest.fixture(scope="module")
def model():
    return hf_gpt2.from_pretrained(HF_DIR)


@pytest.fixture(scope="module")
def ref():
    return np.load(os.path.join(REF, "gpt2_tiny.npz"))


def test_config_maps_gpt2_settings(model):
    cfg = model.cfg
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.ffn_hidden_size) == (32, 2, 4, 128)
    assert (cfg.activation, cfg.position_embedding, cfg.norm, cfg.tie_word_embeddings) == \
        ("gelu_new", "learned", "layernorm", True)
    assert (cfg.eos_token_id, cfg.pad_token_id) == (299, 299)
    assert not model.training


def test_logits_match_transformers(model, ref):
    out = model(Tensor(ref["input_ids"].astype(np.int32)), Tensor(ref["attention_mask"]))
    assert list(out.keys()) == ["logits"]
    real = ref["attention_mask"].astype(bool)                   # padded positions hold whatever HF computed
    diff = np.abs(out.logits.asnumpy() - ref["logits"])[real]
    assert diff.max() < 1e-4                                    # observed ~4e-6


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
    hf_gpt2.export_pretrained(model, str(tmp_path))
    original, exported = load_safetensors(os.path.join(HF_DIR, "model.safetensors")), \
        load_safetensors(str(tmp_path / "model.safetensors"))
    assert sorted(original) == sorted(exported)
    assert all(np.array_equal(original[k], exported[k]) for k in original)
    with open(tmp_path / "config.json") as f:
        assert hf_gpt2.hf_to_model_config(json.load(f)) == model.cfg
    again = hf_gpt2.from_pretrained(str(tmp_path))
    for (n, a), (m, b) in zip(model.parameters_and_names(), again.parameters_and_names()):
        assert n == m and np.array_equal(a.asnumpy(), b.asnumpy())


def _weights():
    return load_safetensors(os.path.join(HF_DIR, "model.safetensors"))


def _fresh(model):
    from ms_llm.models.gpt import GPTLMHeadModel
    return GPTLMHeadModel(model.cfg)


def test_base_model_file_without_prefix_and_old_buffers_load(model):
    w = {k[len("transformer."):]: v for k, v in _weights().items()}          # GPT2Model.save_pretrained layout
    w["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))       # old causal-mask buffers
    w["h.0.attn.masked_bias"] = np.array(-1e4, np.float32)
    fresh = _fresh(model)
    hf_gpt2.load_into(fresh, w)
    a = dict(model.parameters_and_names())
    assert all(np.array_equal(p.asnumpy(), a[n].asnumpy()) for n, p in fresh.parameters_and_names())


def test_missing_unexpected_misshaped_are_errors_in_hf_names(model):
    w = _weights()
    del w["transformer.h.1.mlp.c_fc.bias"]
    w["transformer.h.2.ln_1.weight"] = np.ones(32, np.float32)
    w["transformer.wpe.weight"] = np.zeros((65, 32), np.float32)
    with pytest.raises(CheckpointMismatchError) as e:
        hf_gpt2.load_into(_fresh(model), w, source="x.safetensors")
    assert e.value.missing == ["transformer.h.1.mlp.c_fc.bias"]
    assert e.value.unexpected == ["transformer.h.2.ln_1.weight"]
    assert e.value.mismatched == [("transformer.wpe.weight", (65, 32), (64, 32))]
    assert "x.safetensors" in str(e.value)


def test_other_heads_warn_and_untied_head_is_required(model, tmp_path):
    w = _weights()
    w["score.weight"] = np.zeros((3, 32), np.float32)                      # GPT2ForSequenceClassification head
    with pytest.warns(UserWarning, match="score.weight"):
        hf_gpt2.load_into(_fresh(model), w)
    with open(os.path.join(HF_DIR, "config.json")) as f:
        cfg = json.load(f)
    cfg["tie_word_embeddings"] = False
    save_safetensors(_weights(), str(tmp_path / "model.safetensors"))
    with open(tmp_path / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(CheckpointMismatchError, match="lm_head.weight"):
        hf_gpt2.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("change,match", [({"activation_function": "quick_gelu"}, "activation_function"),
                                          ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse"),
                                          ({"model_type": "llama"}, "model_type"),
                                          ({"n_embd": None}, "n_embd")])
def test_unsupported_configs_are_named(change, match):
    with open(os.path.join(HF_DIR, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(change)
    with pytest.raises(ValueError, match=match):
        hf_gpt2.hf_to_model_config(cfg)


def test_missing_files_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf_gpt2.from_pretrained(str(tmp_path))
