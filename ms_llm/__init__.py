"""ms_llm: MindSpore-native Transformer, BERT, GPT-3 and Mixture-of-Experts models for Ascend clusters and CPUs.

Nothing heavy runs at import: models, MindSpore graphs and kernels are built when asked for.
"""
__version__ = "0.1.0"


def from_pretrained(directory: str):
    """Load a Hugging Face layout directory (config.json + model.safetensors: BERT, GPT-2, Llama, Switch) or an
    ms_llm run directory; returns the matching ms_llm cell in inference mode."""
    from .checkpoint.hf import from_pretrained as _load
    return _load(directory)


def build_model(model_cfg):
    """The model a :class:`ms_llm.config.ModelConfig` describes."""
    from .models import build_model as _build
    return _build(model_cfg)


def load_config(path=None, overrides=()):
    """A validated :class:`ms_llm.config.RunConfig` from YAML plus ``key.sub=value`` overrides."""
    from .config import load_config as _load
    return _load(path, overrides)


__all__ = ["from_pretrained", "build_model", "load_config", "__version__"]
