"""Hugging Face ``SwitchTransformersForConditionalGeneration`` <-> ms_llm :class:`SwitchTransformer`.

Weight names map one to one (both sides keep torch's ``(out, in)`` layout) except the experts: Hugging Face stores
``experts.expert_{e}.wi.weight`` (F, H) and ``wo.weight`` (H, F) per expert, ms_llm one stacked tensor per matrix,
``experts.w_in`` (E, H, F) = stack(wi^T) and ``w_out`` (E, F, H) = stack(wo^T). The relative position bias lives in
block 0 of each stack on both sides. Tied checkpoints store only ``shared.weight``; copies under
``encoder.embed_tokens`` / ``decoder.embed_tokens`` / ``lm_head`` are accepted when tied and must then be equal.

Hugging Face routes every token of a sequence, padding included, with a fixed ``expert_capacity`` per sequence and
expert; the converted config keeps that (``moe.expert_capacity``), so logits match token for token, drops included.
A missing, unexpected or mis-shaped weight is a :class:`CheckpointMismatchError` naming it.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, Optional

import numpy as np

from ..config.model import ModelConfig, MoEConfig
from .hf_gpt2 import read_hf_dir
from .io import CheckpointMismatchError, assign_weights, atomic_write_json, named_parameters, save_safetensors

__all__ = ["hf_to_model_config", "model_to_hf_config", "convert_hf_to_ms", "hf_state_dict", "from_pretrained",
           "export_pretrained"]

_ACTS = ("relu", "gelu", "gelu_new", "silu")
_TIED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")

# (HF sub-layer path inside a block, ms_llm path inside a block) per stack
_ATTN = (("SelfAttention.q", "self_attn.q_proj"), ("SelfAttention.k", "self_attn.k_proj"),
         ("SelfAttention.v", "self_attn.v_proj"), ("SelfAttention.o", "self_attn.o_proj"))
_CROSS = (("EncDecAttention.q", "cross_attn.q_proj"), ("EncDecAttention.k", "cross_attn.k_proj"),
          ("EncDecAttention.v", "cross_attn.v_proj"), ("EncDecAttention.o", "cross_attn.o_proj"))


def _sparse_step(hf: dict, which: str) -> int:
    n_layers = int(hf["num_layers"] if which == "encoder" else hf.get("num_decoder_layers") or hf["num_layers"])
    n_sparse = int(hf.get(f"num_sparse_{which}_layers", 0) or 0)
    step = hf.get(f"{which}_sparse_step")
    if step is None:
        step = n_layers // n_sparse if n_sparse > 0 else n_layers
    return int(step)


def hf_to_model_config(hf: dict) -> ModelConfig:
    """ModelConfig of a Hugging Face ``SwitchTransformersConfig`` dict (ValueError naming unsupported keys)."""
    if hf.get("model_type", "switch_transformers") != "switch_transformers":
        raise ValueError(f"config.json: model_type '{hf.get('model_type')}' is not 'switch_transformers'")
    for key in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers", "num_experts"):
        if hf.get(key) is None:
            raise ValueError(f"config.json: missing '{key}'")
    act = hf.get("dense_act_fn", "relu")
    if act not in _ACTS:
        raise ValueError(f"config.json: dense_act_fn '{act}' is not supported; supported: {list(_ACTS)}")
    if hf.get("router_dtype", "float32") != "float32":
        raise ValueError(f"config.json: router_dtype '{hf['router_dtype']}': ms_llm routers always run in float32")
    enc_step, dec_step = _sparse_step(hf, "encoder"), _sparse_step(hf, "decoder")
    if enc_step != dec_step or enc_step < 1:
        raise ValueError(f"config.json: encoder_sparse_step={enc_step} and decoder_sparse_step={dec_step} must be "
                         f"equal and >= 1 (ms_llm puts MoE layers at the same depths in both stacks)")
    pad = int(hf.get("pad_token_id") if hf.get("pad_token_id") is not None else 0)
    start = hf.get("decoder_start_token_id")
    eos = hf.get("eos_token_id")
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    moe = MoEConfig(
        num_experts=int(hf["num_experts"]), top_k=1, router="topk",
        moe_every=enc_step, moe_offset=1 if enc_step > 1 else 0,   # HF: layer i sparse iff i % step == 1 (or step 1)
        expert_capacity=int(hf.get("expert_capacity", 64)),
        load_balance_coef=float(hf.get("router_aux_loss_coef", 0.001)),
        z_loss_coef=float(hf.get("router_z_loss_coef", 0.001)),
        jitter_eps=float(hf.get("router_jitter_noise", 0.0)),
        router_bias=bool(hf.get("router_bias", False)),
    )
    return ModelConfig(
        arch="switch", vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["d_model"]),
        num_layers=int(hf["num_layers"]), num_decoder_layers=int(hf.get("num_decoder_layers") or hf["num_layers"]),
        num_heads=int(hf["num_heads"]), head_dim=int(hf["d_kv"]), ffn_hidden_size=int(hf["d_ff"]),
        max_position_embeddings=512, activation=act, norm="rmsnorm",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)), pre_norm=True, final_norm=True,
        position_embedding="relative", relative_num_buckets=int(hf.get("relative_attention_num_buckets", 32)),
        relative_max_distance=int(hf.get("relative_attention_max_distance", 128)), use_bias=False,
        dropout=float(hf.get("dropout_rate", 0.1)), tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        pad_token_id=pad, bos_token_id=int(start) if start is not None else pad,
        eos_token_id=int(eos) if eos is not None else pad, moe=moe)


def model_to_hf_config(cfg: ModelConfig) -> dict:
    """Hugging Face ``SwitchTransformersConfig`` dict of a Switch ModelConfig."""
    m = cfg.moe
    if cfg.arch != "switch":
        raise ValueError(f"model.arch is '{cfg.arch}', not 'switch'")
    if m.top_k != 1 or m.router != "topk":
        raise ValueError(f"model.moe: Hugging Face Switch routes top-1 with router 'topk' (got top_k={m.top_k}, "
                         f"router '{m.router}')")
    if cfg.activation not in _ACTS or m.expert_activation not in (None, cfg.activation):
        raise ValueError(f"model.activation '{cfg.activation}' / moe.expert_activation '{m.expert_activation}' "
                         f"have no Hugging Face Switch equivalent")
    if m.expert_capacity < 1:
        raise ValueError("model.moe.expert_capacity: Hugging Face Switch needs a fixed capacity (>= 1); capacity "
                         "factors have no equivalent there")
    if m.moe_every > 1 and m.moe_offset % m.moe_every != 1:
        raise ValueError(f"model.moe.moe_offset: Hugging Face puts MoE layers at i % step == 1, got offset "
                         f"{m.moe_offset} with moe_every {m.moe_every}")
    sparse = lambda n: n // m.moe_every if m.moe_every > 1 else n   # noqa: E731  HF sparse_step = n // num_sparse
    return {
        "architectures": ["SwitchTransformersForConditionalGeneration"], "model_type": "switch_transformers",
        "vocab_size": cfg.vocab_size, "d_model": cfg.hidden_size, "d_kv": cfg.dim_per_head,
        "d_ff": m.expert_ffn_hidden_size or cfg.ffn_hidden_size, "num_heads": cfg.num_heads,
        "num_layers": cfg.num_layers, "num_decoder_layers": cfg.decoder_layers,
        "num_sparse_encoder_layers": sparse(cfg.num_layers), "num_sparse_decoder_layers": sparse(cfg.decoder_layers),
        "encoder_sparse_step": m.moe_every, "decoder_sparse_step": m.moe_every,
        "num_experts": m.num_experts, "expert_capacity": m.expert_capacity, "router_bias": m.router_bias,
        "router_jitter_noise": m.jitter_eps, "router_dtype": "float32", "router_ignore_padding_tokens": False,
        "relative_attention_num_buckets": cfg.relative_num_buckets,
        "relative_attention_max_distance": cfg.relative_max_distance, "dropout_rate": cfg.dropout,
        "layer_norm_epsilon": cfg.norm_eps, "router_z_loss_coef": m.z_loss_coef,
        "router_aux_loss_coef": m.load_balance_coef, "initializer_factor": 1.0, "dense_act_fn": cfg.activation,
        "is_encoder_decoder": True, "tie_word_embeddings": cfg.tie_word_embeddings, "pad_token_id": cfg.pad_token_id,
        "eos_token_id": cfg.eos_token_id, "decoder_start_token_id": cfg.bos_token_id, "dtype": "float32",
    }


def _name_pairs(cfg: ModelConfig):
    """(HF name, ms_llm name) of every weight except the stacked experts; plus the sparse blocks per stack."""
    pairs = [("shared.weight", "embed_tokens.weight")]
    if not cfg.tie_word_embeddings:
        pairs.append(("lm_head.weight", "lm_head.weight"))
    sparse = []
    for stack, n in (("encoder", cfg.num_layers), ("decoder", cfg.decoder_layers)):
        dec = stack == "decoder"
        pairs.append((f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                      f"{stack}.blocks.0.self_attn.position_bias.weight"))
        pairs.append((f"{stack}.final_layer_norm.weight", f"{stack}.final_norm.weight"))
        ff = 2 if dec else 1
        for i in range(n):
            hb, mb = f"{stack}.block.{i}.layer", f"{stack}.blocks.{i}"
            for h, m in _ATTN + (_CROSS if dec else ()):
                sub = 1 if h.startswith("EncDec") else 0
                pairs.append((f"{hb}.{sub}.{h}.weight", f"{mb}.{m}.weight"))
            pairs.append((f"{hb}.0.layer_norm.weight", f"{mb}.attn_norm.weight"))
            if dec:
                pairs.append((f"{hb}.1.layer_norm.weight", f"{mb}.cross_norm.weight"))
            pairs.append((f"{hb}.{ff}.layer_norm.weight", f"{mb}.ffn_norm.weight"))
            if cfg.moe.is_moe_layer(i):
                pairs.append((f"{hb}.{ff}.mlp.router.classifier.weight", f"{mb}.ffn.router.gate.weight"))
                if cfg.moe.router_bias:
                    pairs.append((f"{hb}.{ff}.mlp.router.classifier.bias", f"{mb}.ffn.router.gate.bias"))
                sparse.append((f"{hb}.{ff}.mlp", f"{mb}.ffn"))
            else:
                pairs.append((f"{hb}.{ff}.mlp.wi.weight", f"{mb}.ffn.fc_in.weight"))
                pairs.append((f"{hb}.{ff}.mlp.wo.weight", f"{mb}.ffn.fc_out.weight"))
    return pairs, sparse


def convert_hf_to_ms(weights: Dict[str, np.ndarray], cfg: ModelConfig, source: str = "") -> Dict[str, np.ndarray]:
    """HF-named arrays -> ms_llm-named arrays (experts stacked and transposed); strict on names."""
    pairs, sparse = _name_pairs(cfg)
    out, used = {}, set()
    missing = []
    for h, m in pairs:
        if h in weights:
            out[m] = weights[h]
            used.add(h)
        else:
            missing.append(h)
    for hp, mp in sparse:
        w_in, w_out = [], []
        for e in range(cfg.moe.num_experts):
            wi, wo = f"{hp}.experts.expert_{e}.wi.weight", f"{hp}.experts.expert_{e}.wo.weight"
            if wi not in weights or wo not in weights:
                missing += [n for n in (wi, wo) if n not in weights]
                continue
            w_in.append(weights[wi].T)                                     # (H, F)
            w_out.append(weights[wo].T)                                    # (F, H)
            used.update((wi, wo))
        if len(w_in) == cfg.moe.num_experts:
            out[f"{mp}.experts.w_in"] = np.stack(w_in)                    # (E, H, F)
            out[f"{mp}.experts.w_out"] = np.stack(w_out)                  # (E, F, H)
    unexpected = []
    for name, arr in weights.items():
        if name in used:
            continue
        if cfg.tie_word_embeddings and name in _TIED_COPIES and "shared.weight" in weights:
            if not np.array_equal(arr, weights["shared.weight"]):
                raise CheckpointMismatchError(unexpected=[f"{name} (differs from shared.weight but the config ties "
                                                          f"the embeddings)"], source=source)
            continue
        unexpected.append(name)
    if missing or unexpected:
        raise CheckpointMismatchError(missing, unexpected, source=source)
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


def hf_state_dict(model) -> Dict[str, np.ndarray]:
    """The model's weights under Hugging Face names (experts unstacked), ready for ``save_pretrained`` layout."""
    params = {n: p.asnumpy() for n, p in named_parameters(model).items()}
    pairs, sparse = _name_pairs(model.cfg)
    out = {h: params[m] for h, m in pairs}
    for hp, mp in sparse:
        w_in, w_out = params[f"{mp}.experts.w_in"], params[f"{mp}.experts.w_out"]
        for e in range(model.cfg.moe.num_experts):
            out[f"{hp}.experts.expert_{e}.wi.weight"] = np.ascontiguousarray(w_in[e].T)   # (F, H)
            out[f"{hp}.experts.expert_{e}.wo.weight"] = np.ascontiguousarray(w_out[e].T)  # (H, F)
    return out


def load_into(model, weights: Dict[str, np.ndarray], source: str = "") -> None:
    """Assign HF-named ``weights`` to a :class:`SwitchTransformer` (MoE statistics buffers keep their values)."""
    mapped = convert_hf_to_ms(weights, model.cfg, source)
    for name, p in named_parameters(model).items():
        if not p.requires_grad:                                            # MoE load statistics, not weights
            mapped[name] = p.asnumpy()
    assign_weights(model, mapped, source=source)


def from_pretrained(directory: str, hf_config: Optional[dict] = None, dropout: Optional[float] = None):
    """The ms_llm :class:`SwitchTransformer` of a Hugging Face Switch directory, in inference mode."""
    from ..models.switch import SwitchTransformer
    hf, weights = read_hf_dir(directory)
    if hf_config is not None:
        hf = dict(hf_config)
    cfg = hf_to_model_config(hf)
    if dropout is not None:
        cfg = dataclasses.replace(cfg, dropout=float(dropout))
    model = SwitchTransformer(cfg)
    load_into(model, weights, source=os.path.join(directory, "model.safetensors"))
    model.set_train(False)
    return model


def export_pretrained(model, directory: str) -> None:
    """Write ``config.json`` + ``model.safetensors`` as ``SwitchTransformersForConditionalGeneration`` saves them."""
    hf_cfg = model_to_hf_config(model.cfg)
    os.makedirs(directory, exist_ok=True)
    save_safetensors(hf_state_dict(model), os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    atomic_write_json(hf_cfg, os.path.join(directory, "config.json"))
