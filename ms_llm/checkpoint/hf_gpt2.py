"""Hugging Face GPT-2 (``GPT2LMHeadModel`` / ``GPT2Model``) <-> ms_llm :class:`~ms_llm.models.gpt.GPTLMHeadModel`.

GPT-2 stores its projections as ``Conv1D`` weights of shape ``(in, out)`` (``y = x @ W + b``), the transpose of
ms_llm's ``Linear`` ``(out, in)``; ``c_attn`` packs q | k | v along its output axis. Names:

=====================================  ==================================================
Hugging Face (``transformer.`` prefix)  ms_llm
=====================================  ==================================================
``wte.weight`` / ``wpe.weight``         ``decoder.embed_tokens.weight`` / ``decoder.embed_positions.weight``
``h.{i}.ln_1.*`` / ``h.{i}.ln_2.*``     ``decoder.blocks.{i}.attn_norm.*`` / ``.ffn_norm.*``
``h.{i}.attn.c_attn.*`` (q|k|v, T)      ``decoder.blocks.{i}.self_attn.{q,k,v}_proj.*``
``h.{i}.attn.c_proj.*`` (T)             ``decoder.blocks.{i}.self_attn.o_proj.*``
``h.{i}.mlp.c_fc.*`` / ``c_proj.*`` (T) ``decoder.blocks.{i}.ffn.fc_in.*`` / ``.fc_out.*``
``ln_f.*``                              ``decoder.final_norm.*``
``lm_head.weight`` (untied only)        ``lm_head.weight``
=====================================  ==================================================

Loading rules (shared with :mod:`ms_llm.checkpoint.hf_llama`; nothing is silently left at its initialisation):
the file is compared, in Hugging Face names, with what the model expects: missing, unexpected and mis-shaped weights
are a :class:`~ms_llm.checkpoint.io.CheckpointMismatchError` listing all of them; weights of other heads of the same
family (e.g. ``score.weight`` of a sequence classifier, ``multiple_choice_head.*``) are dropped with a warning naming
them; buffers (``attn.bias`` / ``attn.masked_bias`` causal masks of old checkpoints) and, for tied models, a saved
``lm_head.weight`` copy are skipped. The prefix is optional (``GPT2Model`` files have none). float16 weights are
upcast to float32. :func:`export_pretrained` writes the layout transformers saves (``transformer.`` prefix, tied head
not stored), so export -> load and load -> export round-trip exactly.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from typing import Callable, Dict, Iterable, Optional, Tuple

import numpy as np

from ..config.model import ModelConfig
from .io import CheckpointMismatchError, assign_weights, atomic_write_json, load_safetensors, named_parameters, \
    save_safetensors

__all__ = ["hf_to_model_config", "model_to_hf_config", "hf_state_dict", "load_into", "from_pretrained",
           "export_pretrained", "read_hf_dir"]

_ACT_HF_TO_MS = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu_fast": "gelu_new", "gelu": "gelu",
                 "relu": "relu", "silu": "silu", "swish": "silu"}
_ACT_MS_TO_HF = {"gelu_new": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}
_PREFIX = "transformer."
_SKIP = re.compile(r"^(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)$")
_OTHER_HEADS = re.compile(r"^(score\.|classifier\.|qa_outputs\.|multiple_choice_head\.)")


# ----------------------------------------------------------------------------------------------------------------
# shared helpers (also used by hf_llama)
# ----------------------------------------------------------------------------------------------------------------
def read_hf_dir(directory: str) -> Tuple[dict, Dict[str, np.ndarray]]:
    """(config dict, name -> array) of a Hugging Face directory; clear errors for missing files."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} is not a directory")
    cfg_path = os.path.join(directory, "config.json")
    st_path = os.path.join(directory, "model.safetensors")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{directory}: no config.json")
    if not os.path.exists(st_path):
        if os.path.exists(os.path.join(directory, "model.safetensors.index.json")):
            raise FileNotFoundError(f"{directory}: sharded safetensors checkpoints are not supported; merge the "
                                    f"shards into one model.safetensors")
        raise FileNotFoundError(f"{directory}: no model.safetensors (pytorch_model.bin is not read: convert it to "
                                f"safetensors first)")
    with open(cfg_path) as f:
        hf = json.load(f)
    return hf, load_safetensors(st_path)


def _require(hf: dict, keys: Iterable[str]) -> None:
    for key in keys:
        if key not in hf or hf[key] is None:
            raise ValueError(f"config.json: missing '{key}'")


def _special_id(value, fallback: int) -> int:
    """A config's bos/eos/pad id; lists (several stop ids) give their first, None the fallback."""
    if value is None:
        return fallback
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else fallback
    return int(value)


def buffer_names(model) -> Dict[str, np.ndarray]:
    """Non-trainable parameter tables of ``model`` (rotary cos/sin, sinusoidal positions) with their values."""
    return {n: p.asnumpy() for n, p in named_parameters(model).items() if not p.requires_grad}


def load_mapped(model, weights: Dict[str, np.ndarray], expected: Dict[str, tuple],
                to_ms: Callable[[Dict[str, np.ndarray]], Dict[str, np.ndarray]], skip: Callable[[str], bool],
                other_head: Callable[[str], bool], source: str) -> None:
    """Check the HF-named ``weights`` against ``expected`` (HF name -> shape), then assign ``to_ms(weights)``.

    Raises CheckpointMismatchError (HF names) for missing / unexpected / mis-shaped weights; warns about and drops
    weights of other heads; silently drops ``skip`` names (buffers, tied copies).
    """
    kept, dropped, unexpected, mismatched = {}, [], [], []
    for name, arr in weights.items():
        if skip(name):
            continue
        if name not in expected:
            (dropped if other_head(name) else unexpected).append(name)
            continue
        if tuple(arr.shape) != tuple(expected[name]):
            mismatched.append((name, tuple(arr.shape), tuple(expected[name])))
            continue
        if arr.dtype != np.float32:
            if arr.dtype.kind != "f":
                raise CheckpointMismatchError(unexpected=[f"{name} (dtype {arr.dtype}, expected floating point)"],
                                              source=source)
            arr = arr.astype(np.float32)
        kept[name] = arr
    missing = [n for n in expected if n not in weights]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(missing, unexpected, mismatched, source)
    if dropped:
        warnings.warn(f"{source or 'checkpoint'}: weights of heads that {type(model).__name__} does not have were "
                      f"not used: {', '.join(sorted(dropped))}", stacklevel=3)
    mapped = to_ms(kept)
    mapped.update(buffer_names(model))
    assign_weights(model, mapped, source=source)


def hf_names_with_prefix(weights: Dict[str, np.ndarray], prefix: str,
                         top_level: Iterable[str]) -> Dict[str, np.ndarray]:
    """Add ``prefix`` to body names of a file saved without it (the base model class), keep top-level heads."""
    top = tuple(top_level)
    if any(n.startswith(prefix) for n in weights):
        return dict(weights)
    return {(n if n.startswith(top) else prefix + n): v for n, v in weights.items()}


# ----------------------------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------------------------
def hf_to_model_config(hf: dict) -> ModelConfig:
    """ModelConfig of a Hugging Face ``GPT2Config`` dict; unsupported settings are ValueErrors naming the key."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"config.json: model_type '{hf.get('model_type')}' is not 'gpt2'")
    _require(hf, ("vocab_size", "n_embd", "n_layer", "n_head"))
    act = hf.get("activation_function", "gelu_new")
    if act not in _ACT_HF_TO_MS:
        raise ValueError(f"config.json: activation_function '{act}' is not supported; supported: "
                         f"{sorted(_ACT_HF_TO_MS)}")
    if hf.get("scale_attn_by_inverse_layer_idx"):
        raise ValueError("config.json: scale_attn_by_inverse_layer_idx=true is not supported")
    if hf.get("scale_attn_weights", True) is False:
        raise ValueError("config.json: scale_attn_weights=false is not supported (scores are scaled by "
                         "1/sqrt(head_dim))")
    if hf.get("add_cross_attention"):
        raise ValueError("config.json: add_cross_attention=true is not supported by the decoder-only model")
    h = int(hf["n_embd"])
    eos = _special_id(hf.get("eos_token_id"), 50256 if int(hf["vocab_size"]) > 50256 else 0)
    return ModelConfig(
        arch="gpt",
        vocab_size=int(hf["vocab_size"]),
        hidden_size=h,
        num_layers=int(hf["n_layer"]),
        num_heads=int(hf["n_head"]),
        ffn_hidden_size=int(hf.get("n_inner") or 4 * h),
        max_position_embeddings=int(hf.get("n_positions", 1024)),
        activation=_ACT_HF_TO_MS[act],
        norm="layernorm",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        pre_norm=True,
        final_norm=True,
        position_embedding="learned",
        use_bias=True,
        dropout=float(hf.get("resid_pdrop", 0.1)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        bos_token_id=_special_id(hf.get("bos_token_id"), eos),
        eos_token_id=eos,
        pad_token_id=_special_id(hf.get("pad_token_id"), eos),   # GPT-2 has no pad token: HF generate pads with eos
    )


def model_to_hf_config(cfg: ModelConfig) -> dict:
    """Hugging Face ``GPT2Config`` dict of a GPT-2-shaped ModelConfig (ValueError naming what does not fit)."""
    problems = []
    if cfg.arch != "gpt":
        problems.append(f"model.arch '{cfg.arch}' (need 'gpt')")
    if cfg.position_embedding != "learned":
        problems.append(f"model.position_embedding '{cfg.position_embedding}' (need 'learned')")
    if cfg.norm != "layernorm" or not cfg.norm_bias:
        problems.append("model.norm (need layernorm with bias)")
    if not cfg.pre_norm or not cfg.final_norm:
        problems.append("model.pre_norm/final_norm (need both true)")
    if cfg.activation not in _ACT_MS_TO_HF:
        problems.append(f"model.activation '{cfg.activation}'")
    if not cfg.use_bias:
        problems.append("model.use_bias (need true)")
    if cfg.kv_heads != cfg.num_heads or cfg.dim_per_head * cfg.num_heads != cfg.hidden_size:
        problems.append("model.num_kv_heads/head_dim (GPT-2 has plain multi-head attention of width hidden_size)")
    if cfg.attention_pattern != "dense":
        problems.append(f"model.attention_pattern '{cfg.attention_pattern}' (GPT-2 is dense)")
    if cfg.scale_embeddings:
        problems.append("model.scale_embeddings (need false)")
    if cfg.moe.num_experts:
        problems.append("model.moe.num_experts (GPT-2 has no MoE layers)")
    if problems:
        raise ValueError("this model has no Hugging Face GPT-2 equivalent: " + "; ".join(problems))
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_position_embeddings,
        "n_embd": cfg.hidden_size,
        "n_layer": cfg.num_layers,
        "n_head": cfg.num_heads,
        "n_inner": cfg.ffn_hidden_size,
        "activation_function": _ACT_MS_TO_HF[cfg.activation],
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": 0.0,
        "layer_norm_epsilon": cfg.norm_eps,
        "initializer_range": cfg.initializer_range,
        "scale_attn_weights": True,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": "float32",
    }


# ----------------------------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------------------------
_LAYER = (("attn_norm", "ln_1"), ("ffn_norm", "ln_2"), ("self_attn.o_proj", "attn.c_proj"),
          ("ffn.fc_in", "mlp.c_fc"), ("ffn.fc_out", "mlp.c_proj"))


def hf_state_dict(model) -> Dict[str, np.ndarray]:
    """HF-named float32 arrays (GPT2LMHeadModel layout) of an ms_llm GPT-2-shaped model."""
    p = {n: v.asnumpy().astype(np.float32) for n, v in named_parameters(model).items()}
    out = {
        _PREFIX + "wte.weight": p["decoder.embed_tokens.weight"],
        _PREFIX + "wpe.weight": p["decoder.embed_positions.weight"],
        _PREFIX + "ln_f.weight": p["decoder.final_norm.weight"],
        _PREFIX + "ln_f.bias": p["decoder.final_norm.bias"],
    }
    for i in range(model.cfg.num_layers):
        ms, hf = f"decoder.blocks.{i}.", f"{_PREFIX}h.{i}."
        for leaf in ("weight", "bias"):
            for m, h in _LAYER:
                w = p[f"{ms}{m}.{leaf}"]
                out[f"{hf}{h}.{leaf}"] = w.T.copy() if leaf == "weight" and not m.endswith("norm") else w
            qkv = [p[f"{ms}self_attn.{x}_proj.{leaf}"] for x in "qkv"]
            out[f"{hf}attn.c_attn.{leaf}"] = np.concatenate(qkv, 0).T.copy() if leaf == "weight" \
                else np.concatenate(qkv, 0)                                     # (H, 3H) / (3H,)
    if not model.cfg.tie_word_embeddings:
        out["lm_head.weight"] = p["lm_head.weight"]
    return out


def _to_ms(weights: Dict[str, np.ndarray], cfg: ModelConfig) -> Dict[str, np.ndarray]:
    """ms_llm-named arrays from a complete, checked HF-named dict (prefix present)."""
    h = cfg.hidden_size
    out = {
        "decoder.embed_tokens.weight": weights[_PREFIX + "wte.weight"],
        "decoder.embed_positions.weight": weights[_PREFIX + "wpe.weight"],
        "decoder.final_norm.weight": weights[_PREFIX + "ln_f.weight"],
        "decoder.final_norm.bias": weights[_PREFIX + "ln_f.bias"],
    }
    for i in range(cfg.num_layers):
        ms, hf = f"decoder.blocks.{i}.", f"{_PREFIX}h.{i}."
        for leaf in ("weight", "bias"):
            for m, hn in _LAYER:
                w = weights[f"{hf}{hn}.{leaf}"]
                out[f"{ms}{m}.{leaf}"] = w.T.copy() if leaf == "weight" and not m.endswith("norm") else w
            c = weights[f"{hf}attn.c_attn.{leaf}"]                              # (H, 3H) or (3H,)
            for j, x in enumerate("qkv"):
                part = c[..., j * h:(j + 1) * h]                                # (H, H) or (H,)
                out[f"{ms}self_attn.{x}_proj.{leaf}"] = part.T.copy() if leaf == "weight" else part.copy()
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = weights["lm_head.weight"]
    return out


def load_into(model, weights: Dict[str, np.ndarray], source: str = "") -> None:
    """Assign HF GPT-2 ``weights`` (with or without the ``transformer.`` prefix) to ``model``, by the module rules."""
    cfg = model.cfg
    weights = hf_names_with_prefix(weights, _PREFIX, ("lm_head.", "score.", "classifier.", "qa_outputs.",
                                                      "multiple_choice_head."))
    expected = {n: tuple(a.shape) for n, a in hf_state_dict(model).items()}

    def skip(name):
        return bool(_SKIP.match(name)) or (name == "lm_head.weight" and cfg.tie_word_embeddings)

    load_mapped(model, weights, expected, lambda w: _to_ms(w, cfg), skip, lambda n: bool(_OTHER_HEADS.match(n)),
                source)


def from_pretrained(directory: str, hf_config: Optional[dict] = None, dropout: Optional[float] = None):
    """The ms_llm ``GPTLMHeadModel`` of a Hugging Face GPT-2 directory, in inference mode."""
    import dataclasses
    from ..models.gpt import GPTLMHeadModel
    hf, weights = read_hf_dir(directory)
    if hf_config is not None:
        hf = dict(hf_config)
    cfg = hf_to_model_config(hf)
    if dropout is not None:
        cfg = dataclasses.replace(cfg, dropout=float(dropout))
    model = GPTLMHeadModel(cfg)
    load_into(model, weights, source=os.path.join(directory, "model.safetensors"))
    model.set_train(False)
    return model


def export_pretrained(model, directory: str) -> None:
    """Write ``config.json`` + ``model.safetensors`` in the layout ``GPT2LMHeadModel.save_pretrained`` writes."""
    hf_cfg = model_to_hf_config(model.cfg)
    os.makedirs(directory, exist_ok=True)
    save_safetensors(hf_state_dict(model), os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    atomic_write_json(hf_cfg, os.path.join(directory, "config.json"))
