"""Structure and self-consistency of the committed Hugging Face reference data (no torch needed).

Catches a broken or partial regeneration by tests/references/make_references.py: every file, key, shape and
dtype promised in tests/references/README.md must be there, model directories must hold the expected tensors,
and the arrays must agree with each other (e.g. stored embeddings really are the L2-normalised masked mean of the
stored hidden states).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

DATA = Path(__file__).resolve().parent / "data"

I64, F32, BOOL = np.dtype(np.int64), np.dtype(np.float32), np.dtype(np.bool_)

# file -> {key: (shape, dtype)}; must match the tables in README.md.
NPZ_SPEC: dict[str, dict[str, tuple[tuple[int, ...], np.dtype]]] = {
    "minilm_l6.npz": {
        "input_ids": ((6, 20), I64),
        "token_type_ids": ((6, 20), I64),
        "attention_mask": ((6, 20), I64),
        "last_hidden_state": ((6, 20, 384), F32),
        "pooler_output": ((6, 384), F32),
        "mean_pooled": ((6, 384), F32),
        "embeddings": ((6, 384), F32),
        "cosine_sim_3x3": ((3, 3), F32),
    },
    "bert_tiny.npz": {
        "input_ids": ((2, 12), I64),
        "token_type_ids": ((2, 12), I64),
        "attention_mask": ((2, 12), I64),
        "last_hidden_state": ((2, 12, 32), F32),
        "pooler_output": ((2, 32), F32),
        "prediction_logits": ((2, 12, 200), F32),
        "seq_relationship_logits": ((2, 2), F32),
    },
    "bert_tiny_heads.npz": {
        "input_ids": ((2, 12), I64),
        "token_type_ids": ((2, 12), I64),
        "attention_mask": ((2, 12), I64),
        "cls_logits": ((2, 3), F32),
        "tok_logits": ((2, 12, 5), F32),
        "qa_start_logits": ((2, 12), F32),
        "qa_end_logits": ((2, 12), F32),
        "nopooler_last_hidden_state": ((2, 12, 32), F32),
    },
    "switch_tiny.npz": {
        "input_ids": ((2, 11), I64),
        "attention_mask": ((2, 11), I64),
        "labels": ((2, 7), I64),
        "decoder_input_ids": ((2, 7), I64),
        "logits": ((2, 7, 300), F32),
        "encoder_last_hidden_state": ((2, 11, 32), F32),
        "encoder_router_logits": ((1, 2, 11, 4), F32),
        "encoder_router_probs": ((1, 2, 11, 4), F32),
        "encoder_expert_index": ((1, 2, 11), I64),
        "decoder_router_logits": ((1, 2, 7, 4), F32),
        "decoder_router_probs": ((1, 2, 7, 4), F32),
        "decoder_expert_index": ((1, 2, 7), I64),
        "loss": ((), F32),
        "ce_loss": ((), F32),
        "encoder_z_loss": ((), F32),
        "encoder_aux_loss": ((), F32),
        "decoder_z_loss": ((), F32),
        "decoder_aux_loss": ((), F32),
        "cap2_expert_capacity": ((), I64),
        "cap2_logits": ((2, 7, 300), F32),
        "cap2_encoder_last_hidden_state": ((2, 11, 32), F32),
        "cap2_encoder_router_logits": ((1, 2, 11, 4), F32),
        "cap2_decoder_router_logits": ((1, 2, 7, 4), F32),
        "cap2_encoder_dropped": ((2, 11), BOOL),
        "cap2_decoder_dropped": ((2, 7), BOOL),
    },
}
_CAUSAL_LM_SPEC = {
    "input_ids": ((2, 10), I64),
    "attention_mask": ((2, 10), I64),
    "logits": ((2, 10, 300), F32),
    "single_input_ids": ((1, 7), I64),
    "single_logits": ((1, 7, 300), F32),
    "gen1_prompt_ids": ((1, 7), I64),
    "gen1_output_ids": ((1, 31), I64),
    "gen2_prompt_ids": ((2, 5), I64),
    "gen2_output_ids": ((2, 29), I64),
    "greedy_min_margin": ((), F32),
    "pad_token_id": ((), I64),
    "eos_token_id": ((), I64),
}
NPZ_SPEC["gpt2_tiny.npz"] = _CAUSAL_LM_SPEC
NPZ_SPEC["llama_tiny.npz"] = _CAUSAL_LM_SPEC

# model dir -> (architectures[0], number of tensors, {tensor: shape} spot checks)
MODEL_DIRS: dict[str, tuple[str, int, dict[str, tuple[int, ...]]]] = {
    "bert_tiny": (
        "BertForPreTraining",
        46,
        {
            "bert.embeddings.word_embeddings.weight": (200, 32),
            "bert.encoder.layer.1.intermediate.dense.weight": (64, 32),
            "bert.pooler.dense.weight": (32, 32),
            "cls.predictions.bias": (200,),
            "cls.seq_relationship.weight": (2, 32),
        },
    ),
    "bert_tiny_cls": ("BertForSequenceClassification", 41, {"classifier.weight": (3, 32)}),
    "bert_tiny_tok": ("BertForTokenClassification", 39, {"classifier.weight": (5, 32)}),
    "bert_tiny_qa": ("BertForQuestionAnswering", 39, {"qa_outputs.weight": (2, 32)}),
    "bert_tiny_nopooler": ("BertModel", 37, {"embeddings.word_embeddings.weight": (200, 32)}),
    "gpt2_tiny": (
        "GPT2LMHeadModel",
        28,
        {
            "transformer.wte.weight": (300, 32),
            "transformer.wpe.weight": (64, 32),
            "transformer.h.1.attn.c_attn.weight": (32, 96),  # Conv1D: (in, out)
            "transformer.h.1.mlp.c_fc.weight": (32, 128),
        },
    ),
    "llama_tiny": (
        "LlamaForCausalLM",
        21,
        {
            "lm_head.weight": (300, 32),
            "model.layers.1.self_attn.q_proj.weight": (32, 32),
            "model.layers.1.self_attn.k_proj.weight": (16, 32),  # 2 kv heads x head_dim 8
            "model.layers.1.mlp.gate_proj.weight": (64, 32),
        },
    ),
    "switch_tiny": (
        "SwitchTransformersForConditionalGeneration",
        61,
        {
            "shared.weight": (300, 32),
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (32, 4),
            "encoder.block.1.layer.1.mlp.router.classifier.weight": (4, 32),
            "encoder.block.1.layer.1.mlp.experts.expert_3.wi.weight": (64, 32),
            "decoder.block.1.layer.2.mlp.experts.expert_0.wo.weight": (32, 64),
            "decoder.block.0.layer.2.mlp.wi.weight": (64, 32),
        },
    ),
}


def _load(name: str) -> dict[str, np.ndarray]:
    with np.load(DATA / name, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("name", sorted(NPZ_SPEC))
def test_npz_keys_shapes_dtypes(name):
    arrays = _load(name)
    spec = NPZ_SPEC[name]
    assert sorted(arrays) == sorted(spec), f"{name}: keys differ from the README"
    for key, (shape, dtype) in spec.items():
        assert arrays[key].shape == shape, f"{name}[{key}] shape {arrays[key].shape} != {shape}"
        assert arrays[key].dtype == dtype, f"{name}[{key}] dtype {arrays[key].dtype} != {dtype}"
        if dtype == F32:
            assert np.isfinite(arrays[key]).all(), f"{name}[{key}] has non-finite values"


@pytest.mark.parametrize("dirname", sorted(MODEL_DIRS))
def test_model_dirs(dirname):
    arch, n_tensors, spot = MODEL_DIRS[dirname]
    cfg = json.loads((DATA / dirname / "config.json").read_text())
    assert cfg["architectures"] == [arch]
    with safe_open(str(DATA / dirname / "model.safetensors"), "np") as f:
        keys = list(f.keys())
        assert len(keys) == n_tensors, f"{dirname}: {len(keys)} tensors, expected {n_tensors}"
        for k in keys:
            assert f.get_slice(k).get_dtype() == "F32", f"{dirname}:{k} is not fp32"
        for k, shape in spot.items():
            assert k in keys, f"{dirname}: missing tensor {k}"
            assert tuple(f.get_slice(k).get_shape()) == shape, f"{dirname}:{k}"


def test_model_configs_match_readme():
    llama = json.loads((DATA / "llama_tiny" / "config.json").read_text())
    assert (llama["num_attention_heads"], llama["num_key_value_heads"], llama["head_dim"]) == (4, 2, 8)
    assert llama["rope_parameters"]["rope_theta"] == 10000.0 and llama["rms_norm_eps"] == 1e-6
    assert llama["tie_word_embeddings"] is False
    gpt2 = json.loads((DATA / "gpt2_tiny" / "config.json").read_text())
    assert gpt2["activation_function"] == "gelu_new" and gpt2["layer_norm_epsilon"] == 1e-5
    assert gpt2["tie_word_embeddings"] is True
    bert = json.loads((DATA / "bert_tiny" / "config.json").read_text())
    assert bert["hidden_act"] == "gelu" and bert["layer_norm_eps"] == 1e-12
    sw = json.loads((DATA / "switch_tiny" / "config.json").read_text())
    assert (sw["encoder_sparse_step"], sw["decoder_sparse_step"], sw["num_experts"]) == (2, 2, 4)
    assert sw["router_jitter_noise"] == 0.0 and sw["expert_capacity"] == 64 and sw["tie_word_embeddings"] is True


def test_minilm_pooling_and_similarity():
    a = _load("minilm_l6.npz")
    mask = a["attention_mask"].astype(np.float64)[..., None]  # (B, S, 1)
    mean = (a["last_hidden_state"] * mask).sum(1) / mask.sum(1)  # (B, H)
    np.testing.assert_allclose(a["mean_pooled"], mean, rtol=1e-5, atol=1e-6)
    norm = mean / np.linalg.norm(mean, axis=1, keepdims=True)  # (B, H)
    np.testing.assert_allclose(a["embeddings"], norm, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a["cosine_sim_3x3"], norm[:3] @ norm[:3].T, atol=1e-6)
    # Published by sentence-transformers for all-MiniLM-L6-v2.
    sim = a["cosine_sim_3x3"]
    np.testing.assert_allclose([sim[0, 1], sim[0, 2], sim[1, 2]], [0.6660, 0.1046, 0.1411], atol=5e-4)
    assert (a["input_ids"][:, 0] == 101).all()  # [CLS]
    assert (a["input_ids"][a["attention_mask"] == 0] == 0).all()  # [PAD]
    sentences = json.loads((DATA / "minilm_l6_sentences.json").read_text(encoding="utf-8"))
    assert len(sentences) == a["input_ids"].shape[0]


def test_bert_inputs_consistent():
    a, h = _load("bert_tiny.npz"), _load("bert_tiny_heads.npz")
    for k in ("input_ids", "token_type_ids", "attention_mask"):
        np.testing.assert_array_equal(a[k], h[k])
    assert a["attention_mask"][1].tolist() == [1] * 8 + [0] * 4
    assert (a["input_ids"][a["attention_mask"] == 0] == 0).all()
    assert a["token_type_ids"].max() == 1


@pytest.mark.parametrize("name", ["gpt2_tiny.npz", "llama_tiny.npz"])
def test_causal_lm_generation_consistent(name):
    a = _load(name)
    eos, pad = int(a["eos_token_id"]), int(a["pad_token_id"])
    np.testing.assert_array_equal(a["gen1_output_ids"][:, :7], a["gen1_prompt_ids"])
    np.testing.assert_array_equal(a["gen2_output_ids"][:, :5], a["gen2_prompt_ids"])
    np.testing.assert_array_equal(a["single_input_ids"], a["gen1_prompt_ids"])
    for key, plen in (("gen1_output_ids", 7), ("gen2_output_ids", 5)):
        new = a[key][:, plen:]
        assert new.shape[1] == 24 and not (new == eos).any(), f"{name}: eos produced, sequence would stop early"
        assert ((new >= 0) & (new < 300)).all()
    assert (a["input_ids"][a["attention_mask"] == 0] == pad).all()
    assert a["attention_mask"][1].tolist() == [1] * 6 + [0] * 4
    assert float(a["greedy_min_margin"]) >= 5e-3
    # Greedy continuation of the unpadded single prompt starts with the argmax of its last-position logits.
    assert a["gen1_output_ids"][0, 7] == a["single_logits"][0, -1].argmax()


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _dropped(logits, capacity):
    onehot = np.eye(logits.shape[-1], dtype=np.int64)[logits.argmax(-1)]  # (B, S, E)
    priority = np.cumsum(onehot, axis=-2)  # (B, S, E)
    return (priority * onehot).sum(-1) > capacity  # (B, S)


def _z_loss(rl):
    m = rl.max(-1, keepdims=True)
    lse = np.log(np.exp(rl - m).sum(-1)) + m[..., 0]  # (B, S)
    return float((lse**2).mean())


def _aux_loss(rl):
    e = rl.shape[-1]
    probs = _softmax(rl)  # (B, S, E)
    frac = np.eye(e)[rl.argmax(-1)].mean(-2)  # (B, E)
    return float((frac * probs.mean(-2)).mean() * e**2)


def test_switch_router_consistent():
    a = _load("switch_tiny.npz")
    for side in ("encoder", "decoder"):
        rl = a[f"{side}_router_logits"]
        np.testing.assert_allclose(a[f"{side}_router_probs"], _softmax(rl), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(a[f"{side}_expert_index"], rl.argmax(-1))
        np.testing.assert_allclose(float(a[f"{side}_z_loss"]), _z_loss(rl[0]), rtol=1e-5)
        np.testing.assert_allclose(float(a[f"{side}_aux_loss"]), _aux_loss(rl[0]), rtol=1e-5)
        assert not _dropped(rl[0], 64).any()
        cap = int(a["cap2_expert_capacity"])
        np.testing.assert_array_equal(a[f"cap2_{side}_dropped"], _dropped(a[f"cap2_{side}_router_logits"][0], cap))
        assert a[f"cap2_{side}_dropped"].any()
    total = float(a["ce_loss"]) + 1e-3 * (
        float(a["encoder_z_loss"]) + float(a["decoder_z_loss"])
    ) + 1e-3 * (float(a["encoder_aux_loss"]) + float(a["decoder_aux_loss"]))
    np.testing.assert_allclose(float(a["loss"]), total, rtol=1e-5)
    # decoder_input_ids = labels shifted right with decoder_start_token_id 0.
    np.testing.assert_array_equal(a["decoder_input_ids"][:, 1:], a["labels"][:, :-1])
    assert (a["decoder_input_ids"][:, 0] == 0).all()
    # Dropping tokens at capacity 2 must change the output.
    assert np.abs(a["cap2_logits"] - a["logits"]).max() > 1e-3


def test_sizes():
    files = [p for p in DATA.rglob("*") if p.is_file()]
    assert all(p.stat().st_size < 2 * 1024 * 1024 for p in files)
    assert sum(p.stat().st_size for p in files) < 8 * 1024 * 1024
