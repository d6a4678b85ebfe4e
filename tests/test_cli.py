"""`ms-llm` command line: help, config errors before compilation, plan, train + evaluate + convert round trip."""
import os
import subprocess
import sys

import pytest

from ms_llm.cli import build_parser, main

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("train", "evaluate", "generate", "convert", "plan", "reshard"):
        assert cmd in out


def test_python_dash_m_runs():
    r = subprocess.run([sys.executable, "-m", "ms_llm", "--help"], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0 and "train" in r.stdout


def test_config_error_is_reported_before_any_graph(capsys):
    rc = main(["train", os.path.join(ROOT, "configs", "transformer", "tiny_reverse.yaml"), "model.hiden_size=3"])
    assert rc == 2
    assert "unknown key 'model.hiden_size' (did you mean 'hidden_size'?)" in capsys.readouterr().err


def test_train_with_overrides_only_uses_the_default_config(capsys):
    """`ms-llm train key=value` (as `bash scripts/quickstart.sh train.steps=60`): the first argument is an override
    of the default tiny GPT config, not a config path."""
    rc = main(["train", "model.hiden_size=3"])
    assert rc == 2
    assert "unknown key 'model.hiden_size' (did you mean 'hidden_size'?)" in capsys.readouterr().err


def test_plan_prints_ranked_layouts(capsys):
    rc = main(["plan", "--model", os.path.join(ROOT, "configs", "transformer", "base.yaml"), "--devices", "8",
               "--device-type", "910B", "--top", "2"])
    out = capsys.readouterr().out
    assert rc == 0 and "time = data x FLOPs/token" in out and "dp" in out


def test_train_evaluate_and_resume_from_cli(tmp_path, capsys):
    cfg = os.path.join(ROOT, "configs", "transformer", "tiny_reverse.yaml")
    small = ["train.steps=2", "data.num_eval=4", "train.progress_bar=false", "model.hidden_size=16",
             "model.ffn_hidden_size=32", "model.num_layers=1", "model.num_decoder_layers=1"]
    assert main(["train", cfg, *small, "--output-dir", str(tmp_path)]) == 0
    assert main(["train", cfg, *small, "train.steps=3", "--output-dir", str(tmp_path), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "step_00000002.ckpt" in out
    assert main(["evaluate", str(tmp_path)]) == 0
    assert "exact_match" in capsys.readouterr().out
