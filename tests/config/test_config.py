import os

import pytest
import yaml

from ms_llm.config import ConfigError, RunConfig, load_config, to_dict
from ms_llm.config.base import from_dict
from ms_llm.config.model import ModelConfig

ROOT = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)


def test_unknown_key_names_key_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown key 'model.hiden_size'.*did you mean 'hidden_size'"):
        load_config(None, ["model.hiden_size=64"])


def test_unknown_section_suggests():
    with pytest.raises(ConfigError, match=r"unknown section 'modle'.*did you mean 'model'"):
        load_config(None, ["modle.hidden_size=64"])


def test_hidden_not_divisible_by_heads():
    with pytest.raises(ConfigError, match=r"model.hidden_size: 30 is not divisible by num_heads=4"):
        load_config(None, ["model.hidden_size=30"])


@pytest.mark.parametrize("override,match", [
    ("train.lr=-1", r"train.lr: must be > 0"),
    ("model.dropout=1.5", r"model.dropout: must be in \[0, 1\)"),
    ("train.weight_decay=-0.1", r"train.weight_decay: must be >= 0"),
    ("model.activation=gleu", r"model.activation: 'gleu' is not one of .*did you mean 'gelu'"),
    ("data.corpus=/no/such/file.txt", r"data.corpus: file not found"),
    ("train.batch_size=10", None),
    ("model.num_kv_heads=3", r"model.num_kv_heads"),
    ("model.moe.top_k=5", None),
    ("train.steps=ten", r"train.steps: expected an integer"),
    ("model.moe.dispatch_impl=scatter", r"moe.dispatch_impl: 'scatter' is not one of"),
])
def test_bad_values_name_the_field(override, match):
    if override == "train.batch_size=10":
        with pytest.raises(ConfigError, match=r"train.batch_size: 10 is not divisible by grad_accum_steps=4"):
            load_config(None, [override, "train.grad_accum_steps=4"])
        return
    if override == "model.moe.top_k=5":
        with pytest.raises(ConfigError, match=r"moe.top_k: must be in \[1, num_experts=4\]"):
            load_config(None, ["model.moe.num_experts=4", override])
        return
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_cross_section_checks():
    with pytest.raises(ConfigError, match=r"parallel.model_parallel: 3 does not divide model.num_heads=4"):
        load_config(None, ["parallel.mode=semi_auto_parallel", "parallel.model_parallel=3"])
    with pytest.raises(ConfigError, match=r"data.task: seq2seq task 'reverse' needs an encoder-decoder arch"):
        load_config(None, ["data.task=reverse", "model.arch=gpt"])


def test_overrides_typed_and_roundtrip(tmp_path):
    cfg = load_config(None, ["model.arch=transformer", "data.task=sort", "train.adam_betas=[0.9, 0.98]",
                             "model.num_kv_heads=null", "train.lr=3e-4"])
    assert cfg.train.adam_betas == (0.9, 0.98)
    assert cfg.train.lr == pytest.approx(3e-4)
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(to_dict(cfg)))
    assert load_config(str(p)) == cfg


def test_frozen():
    cfg = ModelConfig()
    with pytest.raises(Exception):
        cfg.hidden_size = 3


@pytest.mark.parametrize("path", sorted(
    os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(ROOT, "configs")) for f in fs if f.endswith(".yaml")))
def test_every_shipped_config_loads(path):
    assert isinstance(load_config(path), RunConfig)
