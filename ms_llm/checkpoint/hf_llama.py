"""Hugging Face Llama (``LlamaForCausalLM`` / ``LlamaModel``) <-> ms_llm :class:`~ms_llm.models.gpt.GPTLMHeadModel`.

The decoder options Llama needs: RMSNorm, rotary positions (half-split ``rotate_half`` layout, base
``rope_theta``), SwiGLU feed-forward ``down(silu(gate(x)) * up(x))``, grouped-query attention, no biases, untied
output head. Both sides store ``(out, in)`` matrices, so nothing is transposed. Names:

=============================================  =============================================
Hugging Face                                   ms_llm
=============================================  =============================================
``model.embed_tokens.weight``                  ``decoder.embed_tokens.weight``
``model.layers.{i}.input_layernorm.weight``    ``decoder.blocks.{i}.attn_norm.weight``
``model.layers.{i}.self_attn.{q,k,v,o}_proj``  ``decoder.blocks.{i}.self_attn.{q,k,v,o}_proj``
``model.layers.{i}.post_attention_layernorm``  ``decoder.blocks.{i}.ffn_norm``
``model.layers.{i}.mlp.gate_proj``             ``decoder.blocks.{i}.ffn.fc_gate``
``model.layers.{i}.mlp.up_proj``               ``decoder.blocks.{i}.ffn.fc_in``
``model.layers.{i}.mlp.down_proj``             ``decoder.blocks.{i}.ffn.fc_out``
``model.norm.weight``                          ``decoder.final_norm.weight``
``lm_head.weight``                             ``lm_head.weight`` (absent when tied)
=============================================  =============================================

Loading follows the rules of :mod:`ms_llm.checkpoint.hf_gpt2` (errors for missing / unexpected / mis-shaped weights
in HF names, warnings for other heads such as ``score.weight``); ``rotary_emb.inv_freq`` buffers are skipped. The
RoPE base is read from ``rope_parameters.rope_theta`` (transformers 5.x) or ``rope_theta`` (4.x); RoPE scaling
variants (linear, dynamic, llama3, yarn) are rejected with a ValueError. A list of eos ids keeps its first as
``eos_token_id``.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Dict, Optional

import numpy as np

from ..config.model import ModelConfig
from .hf_gpt2 import _require, _special_id, hf_names_with_prefix, load_mapped, read_hf_dir
from .io import atomic_write_json, named_parameters, save_safetensors

__all__ = ["hf_to_model_config", "model_to_hf_config", "hf_state_dict", "load_into", "from_pretrained",
           "export_pretrained"]

_PREFIX = "model."
_ACT_HF_TO_MS = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu", "relu": "reglu"}
_ACT_MS_TO_HF = {v: k for k, v in _ACT_HF_TO_MS.items() if k != "swish"}
_SKIP = re.compile(r"^(model\.)?(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq$")
_OTHER_HEADS = re.compile(r"^(score\.|classifier\.|qa_outputs\.)")
_LAYER = (("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm"),
          ("self_attn.q_proj", "self_attn.q_proj"), ("self_attn.k_proj", "self_attn.k_proj"),
          ("self_attn.v_proj", "self_attn.v_proj"), ("self_attn.o_proj", "self_attn.o_proj"),
          ("ffn.fc_gate", "mlp.gate_proj"), ("ffn.fc_in", "mlp.up_proj"), ("ffn.fc_out", "mlp.down_proj"))


def _rope_theta(hf: dict) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind != "default":
        raise ValueError(f"config.json: rope_type '{kind}' is not supported (only the default RoPE)")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def hf_to_model_config(hf: dict) -> ModelConfig:
    """ModelConfig of a Hugging Face ``LlamaConfig`` dict; unsupported settings are ValueErrors naming the key."""
    if hf.get("model_type", "llama") != "llama":
        raise ValueError(f"config.json: model_type '{hf.get('model_type')}' is not 'llama'")
    _require(hf, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"))
    act = hf.get("hidden_act", "silu")
    if act not in _ACT_HF_TO_MS:
        raise ValueError(f"config.json: hidden_act '{act}' is not supported; supported: {sorted(_ACT_HF_TO_MS)}")
    attn_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if attn_bias != mlp_bias:
        raise ValueError(f"config.json: attention_bias={attn_bias} with mlp_bias={mlp_bias} is not supported "
                         f"(ms_llm has one use_bias switch)")
    h, nh = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim")
    eos = _special_id(hf.get("eos_token_id"), 2)
    return ModelConfig(
        arch="gpt",
        vocab_size=int(hf["vocab_size"]),
        hidden_size=h,
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=nh,
        num_kv_heads=int(hf.get("num_key_value_heads") or nh),
        head_dim=int(head_dim) if head_dim is not None and int(head_dim) != h // nh else None,
        ffn_hidden_size=int(hf["intermediate_size"]),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        activation=_ACT_HF_TO_MS[act],
        norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        pre_norm=True,
        final_norm=True,
        position_embedding="rotary",
        rope_theta=_rope_theta(hf),
        use_bias=attn_bias,
        dropout=float(hf.get("attention_dropout", 0.0)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        bos_token_id=_special_id(hf.get("bos_token_id"), 1),
        eos_token_id=eos,
        pad_token_id=_special_id(hf.get("pad_token_id"), eos),
    )


def model_to_hf_config(cfg: ModelConfig) -> dict:
    """Hugging Face ``LlamaConfig`` dict of a Llama-shaped ModelConfig (ValueError naming what does not fit)."""
    problems = []
    if cfg.arch != "gpt":
        problems.append(f"model.arch '{cfg.arch}' (need 'gpt')")
    if cfg.position_embedding != "rotary":
        problems.append(f"model.position_embedding '{cfg.position_embedding}' (need 'rotary')")
    if cfg.norm != "rmsnorm":
        problems.append(f"model.norm '{cfg.norm}' (need 'rmsnorm')")
    if not cfg.pre_norm or not cfg.final_norm:
        problems.append("model.pre_norm/final_norm (need both true)")
    if cfg.activation not in _ACT_MS_TO_HF:
        problems.append(f"model.activation '{cfg.activation}' (need a gated activation: swiglu, geglu, reglu)")
    if cfg.attention_pattern != "dense":
        problems.append(f"model.attention_pattern '{cfg.attention_pattern}' (Llama is dense)")
    if cfg.scale_embeddings:
        problems.append("model.scale_embeddings (need false)")
    if cfg.moe.num_experts:
        problems.append("model.moe.num_experts (Llama has no MoE layers)")
    if problems:
        raise ValueError("this model has no Hugging Face Llama equivalent: " + "; ".join(problems))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.dim_per_head,
        "hidden_act": _ACT_MS_TO_HF[cfg.activation],
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "rope_theta": cfg.rope_theta,
        "attention_bias": cfg.use_bias,
        "mlp_bias": cfg.use_bias,
        "attention_dropout": cfg.dropout,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": cfg.initializer_range,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": "float32",
    }


def _name_pairs(cfg: ModelConfig):
    """(ms_llm name, HF name) of every trainable weight."""
    leaves = ("weight", "bias") if cfg.use_bias else ("weight",)
    pairs = [("decoder.embed_tokens.weight", _PREFIX + "embed_tokens.weight"),
             ("decoder.final_norm.weight", _PREFIX + "norm.weight")]
    for i in range(cfg.num_layers):
        for m, h in _LAYER:
            for leaf in (("weight",) if m.endswith("norm") else leaves):
                pairs.append((f"decoder.blocks.{i}.{m}.{leaf}", f"{_PREFIX}layers.{i}.{h}.{leaf}"))
    if not cfg.tie_word_embeddings:
        pairs.append(("lm_head.weight", "lm_head.weight"))
    return pairs


def hf_state_dict(model) -> Dict[str, np.ndarray]:
    """HF-named float32 arrays (LlamaForCausalLM layout) of an ms_llm Llama-shaped model."""
    p = named_parameters(model)
    return {h: p[m].asnumpy().astype(np.float32) for m, h in _name_pairs(model.cfg)}


def load_into(model, weights: Dict[str, np.ndarray], source: str = "") -> None:
    """Assign HF Llama ``weights`` (with or without the ``model.`` prefix) to ``model``, by the module rules."""
    cfg = model.cfg
    weights = hf_names_with_prefix(weights, _PREFIX, ("lm_head.", "score.", "classifier.", "qa_outputs."))
    expected = {n: tuple(a.shape) for n, a in hf_state_dict(model).items()}
    pairs = _name_pairs(cfg)

    def skip(name):
        return bool(_SKIP.match(name)) or (name == "lm_head.weight" and cfg.tie_word_embeddings)

    load_mapped(model, weights, expected, lambda w: {m: w[h] for m, h in pairs}, skip,
                lambda n: bool(_OTHER_HEADS.match(n)), source)


def from_pretrained(directory: str, hf_config: Optional[dict] = None, dropout: Optional[float] = None):
    """The ms_llm ``GPTLMHeadModel`` of a Hugging Face Llama directory, in inference mode."""
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
    """Write ``config.json`` + ``model.safetensors`` in the layout ``LlamaForCausalLM.save_pretrained`` writes."""
    hf_cfg = model_to_hf_config(model.cfg)
    os.makedirs(directory, exist_ok=True)
    save_safetensors(hf_state_dict(model), os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    atomic_write_json(hf_cfg, os.path.join(directory, "config.json"))
