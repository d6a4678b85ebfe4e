"""``from_pretrained`` / ``export_pretrained``: Hugging Face layout directories and ms_llm run directories."""
from __future__ import annotations

import importlib
import json
import os

# HF config.json "model_type" -> converter module (each has from_pretrained(dir, hf_config) and export_pretrained)
CONVERTERS = {
    "bert": "ms_llm.checkpoint.hf_bert",
    "gpt2": "ms_llm.checkpoint.hf_gpt2",
    "llama": "ms_llm.checkpoint.hf_llama",
    "switch_transformers": "ms_llm.checkpoint.hf_switch",
}


def read_hf_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory}: no config.json (expected a Hugging Face layout directory with "
                                f"config.json + model.safetensors, or an ms_llm run directory)")
    with open(path) as f:
        return json.load(f)


def converter_for(model_type: str):
    if model_type not in CONVERTERS:
        raise ValueError(f"no converter for Hugging Face model_type '{model_type}'; supported: {sorted(CONVERTERS)}")
    return importlib.import_module(CONVERTERS[model_type])


def from_pretrained(directory: str):
    """The ms_llm cell for a Hugging Face directory (by its model_type) or an ms_llm run directory, in eval mode."""
    from ..training import checkpointing
    from .hf_bert import resolve_path
    directory = resolve_path(directory)   # also accepts pkg:<package>/<path> for weights shipped in a package
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"not a directory: {directory}")
    meta = checkpointing.latest(directory)
    if meta is not None:
        from ..config import from_dict, RunConfig
        cfg = from_dict(RunConfig, meta["config"])
        module, name = meta["model_class"].split(":")
        model = getattr(importlib.import_module(module), name)(cfg.model)
        checkpointing.load_model(meta, model)
        model.set_train(False)
        return model
    hf_config = read_hf_config(directory)
    model_type = hf_config.get("model_type")
    return converter_for(model_type).from_pretrained(directory, hf_config)


# the data task recorded with a converted model (a RunConfig pairs every arch with a task it can train on)
DEFAULT_TASK = {"bert": "mlm", "gpt": "causal_lm", "glam": "causal_lm", "transformer": "copy", "switch": "copy"}


def hf_module_for(model_cfg) -> str:
    """The HF layout an ms_llm model exports to."""
    if model_cfg.arch == "bert":
        return "bert"
    if model_cfg.arch == "switch":
        return "switch_transformers"
    if model_cfg.arch == "gpt":
        return "llama" if model_cfg.position_embedding == "rotary" else "gpt2"
    raise ValueError(f"arch '{model_cfg.arch}' has no Hugging Face layout to export to")


def convert(src: str, dst: str, to: str) -> str:
    """``to='ms'``: HF directory -> ms_llm directory; ``to='hf'``: ms_llm directory -> HF directory."""
    from ..config import DataConfig, RunConfig, TrainConfig
    from ..training import checkpointing
    if to == "ms":
        hf_config = read_hf_config(src)
        conv = converter_for(hf_config.get("model_type"))
        model = conv.from_pretrained(src, hf_config)
        mcfg = conv.hf_to_model_config(hf_config)
        run = RunConfig(model=mcfg, data=DataConfig(task=DEFAULT_TASK[mcfg.arch]), train=TrainConfig(output_dir=dst))
        return checkpointing.save(dst, 0, model, [], run)
    if to == "hf":
        meta = checkpointing.latest(src)
        if meta is None:
            raise FileNotFoundError(f"{src}: no ms_llm checkpoint (checkpoints/latest.json)")
        model = from_pretrained(src)
        from ..config import from_dict
        mcfg = from_dict(RunConfig, meta["config"]).model
        converter_for(hf_module_for(mcfg)).export_pretrained(model, dst)
        return dst
    raise ValueError(f"--to must be 'ms' or 'hf', got {to!r}")
