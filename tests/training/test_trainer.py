"""Trainer: resume equivalence, atomic checkpoints, strict loading, metrics and loss curve."""
import json
import os

import numpy as np
import pytest
import mindspore as ms

from ms_llm.checkpoint.io import CheckpointMismatchError
from ms_llm.config import load_config
from ms_llm.models import build_model
from ms_llm.training import checkpointing
from ms_llm.training.trainer import Trainer

TINY = ["model.arch=transformer", "data.task=reverse", "model.vocab_size=12", "model.hidden_size=16",
        "model.num_layers=1", "model.num_decoder_layers=1", "model.num_heads=2", "model.ffn_hidden_size=32",
        "model.max_position_embeddings=8", "model.dropout=0.0", "data.src_length=5", "data.min_length=2",
        "data.num_train=200", "data.num_eval=8", "train.batch_size=8", "train.log_every=2",
        "train.schedule=constant", "train.warmup_steps=0", "train.progress_bar=false", "train.peak_tflops=1.0"]


def _cfg(tmp, *extra):
    return load_config(None, TINY + [f"train.output_dir={tmp}", *extra])


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_resume_continues_like_an_uninterrupted_run(tmp_path):
    full = str(tmp_path / "full")
    Trainer(_cfg(full, "train.steps=6"), log=lambda *_: None).fit()
    part = str(tmp_path / "part")
    Trainer(_cfg(part, "train.steps=3"), log=lambda *_: None).fit()
    Trainer(_cfg(part, "train.steps=6"), log=lambda *_: None).fit(resume=True)
    a, b = _losses(full), _losses(part)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([b[s] for s in (4, 5, 6)], [a[s] for s in (4, 5, 6)], rtol=1e-6)
    wa = checkpointing.read(checkpointing.latest(full))
    wb = checkpointing.read(checkpointing.latest(part))
    for k in wa:
        np.testing.assert_allclose(wb[k], wa[k], rtol=1e-6, atol=1e-7, err_msg=k)
    assert os.path.exists(os.path.join(part, "loss_curve.png"))
    assert os.path.exists(os.path.join(part, "checkpoints", "step_00000006.yaml"))


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    cfg = _cfg(out, "train.steps=2")
    Trainer(cfg, log=lambda *_: None).fit()
    before = checkpointing.latest(out)
    model = build_model(cfg.model)

    def broken_save(entries, path, *a, **k):
        with open(path, "wb") as f:
            f.write(b"half-written")
        raise OSError("disk full")

    monkeypatch.setattr(ms, "save_checkpoint", broken_save)
    with pytest.raises(OSError, match="disk full"):
        checkpointing.save(out, 3, model, [], cfg)
    after = checkpointing.latest(out)
    assert after["step"] == before["step"] == 2
    assert not [f for f in os.listdir(os.path.join(out, "checkpoints")) if f.startswith(".tmp")]
    checkpointing.load_model(after, model)   # still loads and verifies


def test_corrupt_and_mismatched_checkpoints_are_errors(tmp_path):
    out = str(tmp_path / "run")
    cfg = _cfg(out, "train.steps=1")
    Trainer(cfg, log=lambda *_: None).fit()
    meta = checkpointing.latest(out)
    other = load_config(None, TINY + ["model.hidden_size=32", "model.num_decoder_layers=2"]).model
    with pytest.raises(CheckpointMismatchError) as e:
        checkpointing.load_model(meta, build_model(other))
    msg = str(e.value)
    assert "missing (" in msg and "decoder.blocks.1.self_attn.q_proj.weight" in msg
    assert "mis-shaped (" in msg and "embed_tokens.weight file (12, 16) vs model (12, 32)" in msg
    with open(meta["path"], "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00" * 8)
    with pytest.raises(ValueError, match="sha256"):
        checkpointing.load_model(meta, build_model(cfg.model))
