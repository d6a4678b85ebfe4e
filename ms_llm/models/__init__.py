"""Every model, by config ``arch``: a plain dict, imported lazily so that building one model loads only its file."""
from __future__ import annotations

import importlib

# arch -> (module, class) built as cls(model_cfg)
MODELS = {
    "transformer": ("ms_llm.models.transformer", "Transformer"),
    "bert": ("ms_llm.models.bert", "BertForPreTraining"),
    "gpt": ("ms_llm.models.gpt", "GPTLMHeadModel"),
    "switch": ("ms_llm.models.switch", "SwitchTransformer"),
    "glam": ("ms_llm.models.glam", "GLaM"),
}


def model_class(arch: str):
    if arch not in MODELS:
        raise ValueError(f"unknown arch '{arch}'; available: {sorted(MODELS)}")
    module, name = MODELS[arch]
    return getattr(importlib.import_module(module), name)


def build_model(model_cfg):
    """The model a ModelConfig describes."""
    return model_class(model_cfg.arch)(model_cfg)
