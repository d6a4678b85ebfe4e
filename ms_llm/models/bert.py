"""BERT (Devlin et al. 2018): encoder, pre-training heads (MLM + NSP) and fine-tuning heads.

Built from the shared layers: learned word + position + token-type embeddings followed by LayerNorm and dropout,
post-norm :class:`~ms_llm.layers.block.TransformerBlock` s (``cfg.pre_norm`` must be False), a tanh pooler over the
first ([CLS]) token. The cells follow Hugging Face's calling conventions: ``model(input_ids, token_type_ids=None,
attention_mask=None)`` and outputs named like theirs (``last_hidden_state``, ``pooler_output``,
``prediction_logits``, ``seq_relationship_logits``, ``logits``, ``start_logits``, ``end_logits``), reachable by
attribute, key or index when the cell is called from Python; inside a graph the cells return plain tuples.

Differences from Hugging Face: attention probabilities are not dropped out (the fused kernels keep no probability
matrix), and a padded key is excluded exactly instead of through an additive -10000 (the same up to float error for
every row that has at least one visible key). ``tests/models/test_bert.py`` checks parity on seeded checkpoints and
on the real all-MiniLM-L6-v2.
"""
from __future__ import annotations

import zlib

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from ..layers.block import TransformerBlock
from ..layers.common import dropout, ms_dtype, normal_param
from ..layers.embedding import Embedding
from ..layers.linear import BLAS_MIN_ROWS, Linear, blas_product
from ..layers.mlp import Activation, FeedForward
from ..layers.norm import LayerNorm
from .outputs import NamedOutputs

__all__ = ["BertModel", "BertModelWithoutPooler", "BertForPreTraining", "BertForSequenceClassification", "BertForTokenClassification",
           "BertForQuestionAnswering", "BertPreTrainingLoss", "BertPreTrainingEval", "BertClassificationLoss",
           "BertTokenClassificationLoss", "BertSpanLoss", "bert_flops_per_token", "check_bert_config"]


def check_bert_config(cfg) -> None:
    """ValueError naming the offending key unless ``cfg`` (a ModelConfig) describes a BERT encoder."""
    if cfg.pre_norm:
        raise ValueError("model.pre_norm: BERT is post-norm; set model.pre_norm=false")
    if cfg.position_embedding != "learned":
        raise ValueError(f"model.position_embedding: BERT uses learned absolute positions, got "
                         f"'{cfg.position_embedding}'")
    if cfg.type_vocab_size < 1:
        raise ValueError("model.type_vocab_size: BERT needs token-type (segment) embeddings; set it to 2")
    if cfg.norm != "layernorm" or not cfg.norm_bias:
        raise ValueError(f"model.norm: BERT uses LayerNorm with bias, got norm='{cfg.norm}', norm_bias={cfg.norm_bias}")
    if cfg.activation not in ("relu", "gelu", "gelu_new", "silu"):
        raise ValueError(f"model.activation: BERT's feed-forward is not gated; got '{cfg.activation}'")
    if cfg.moe.num_experts:
        raise ValueError("model.moe.num_experts: BERT has no MoE variant")
    if cfg.head_dim is not None and cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        raise ValueError(f"model.head_dim: BERT needs head_dim * num_heads == hidden_size, got {cfg.head_dim} * "
                         f"{cfg.num_heads} != {cfg.hidden_size}")
    if cfg.kv_heads != cfg.num_heads:
        raise ValueError("model.num_kv_heads: BERT uses full multi-head attention (num_kv_heads = num_heads)")


def _to_tensor(x, name: str):
    """A Python-level input (numpy array, list, Tensor) as an int32 Tensor (attention_mask may also be float, as
    in Hugging Face); None passes through."""
    if x is None or isinstance(x, Tensor):
        return x
    arr = np.asarray(x)
    if name == "attention_mask" and arr.dtype.kind == "f":
        return Tensor(arr.astype(np.float32))
    if arr.dtype.kind not in "iub":
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    return Tensor(arr.astype(np.int32))


class _HFInputs(NamedOutputs):
    """Python-side call: HF keyword names, numpy inputs, and shape/range checks before anything compiles."""

    input_names = ("input_ids", "token_type_ids", "attention_mask")

    def __call__(self, *args, **kwargs):
        if len(args) > len(self.input_names):
            raise ValueError(f"{type(self).__name__} takes at most {len(self.input_names)} inputs "
                             f"{self.input_names}, got {len(args)}")
        unknown = [k for k in kwargs if k not in self.input_names]
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown input(s) {unknown}; inputs are {self.input_names}")
        given = dict(zip(self.input_names, args))
        for k in kwargs:
            if k in given:
                raise ValueError(f"{type(self).__name__}: input '{k}' given twice")
        given.update(kwargs)
        if given.get("input_ids") is None:
            raise ValueError(f"{type(self).__name__}: input_ids is required")
        vals = [_to_tensor(given.get(n), n) for n in self.input_names]
        self.check_inputs(*vals)
        return super().__call__(*vals)

    def check_inputs(self, input_ids, token_type_ids=None, attention_mask=None):
        cfg = self.config
        if len(input_ids.shape) != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        b, s = input_ids.shape
        if s > cfg.max_position_embeddings:
            raise ValueError(f"input_ids: sequence length {s} exceeds max_position_embeddings="
                             f"{cfg.max_position_embeddings}")
        for name, t in (("token_type_ids", token_type_ids), ("attention_mask", attention_mask)):
            if t is not None and tuple(t.shape) != (b, s):
                raise ValueError(f"{name} must have the shape of input_ids {(b, s)}, got {tuple(t.shape)}")
        ids = input_ids.asnumpy()
        if ids.min() < 0 or ids.max() >= cfg.vocab_size:
            raise ValueError(f"input_ids: values must be in [0, vocab_size={cfg.vocab_size}), got "
                             f"[{ids.min()}, {ids.max()}]")
        if token_type_ids is not None:
            tt = token_type_ids.asnumpy()
            if tt.min() < 0 or tt.max() >= cfg.type_vocab_size:
                raise ValueError(f"token_type_ids: values must be in [0, type_vocab_size={cfg.type_vocab_size}), "
                                 f"got [{tt.min()}, {tt.max()}]")


class BertEmbeddings(nn.Cell):
    """word + position + token-type embeddings, LayerNorm, dropout."""

    def __init__(self, cfg):
        super().__init__()
        std = cfg.initializer_range
        self.word_embeddings = Embedding(cfg.vocab_size, cfg.hidden_size, std, "vocab")
        self.position_embeddings = Embedding(cfg.max_position_embeddings, cfg.hidden_size, std, "seq")
        self.token_type_embeddings = Embedding(cfg.type_vocab_size, cfg.hidden_size, std, None)
        self.norm = LayerNorm(cfg.hidden_size, cfg.norm_eps)
        self.drop = dropout(cfg.dropout)

    def construct(self, input_ids, token_type_ids, positions):
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)   # (B, S, H)
        x = x + self.token_type_embeddings(token_type_ids)                            # (B, S, H)
        return self.drop(self.norm(x))


class BertPooler(nn.Cell):
    """tanh(W h_[CLS] + b)."""

    def __init__(self, cfg):
        super().__init__()
        self.dense = Linear(cfg.hidden_size, cfg.hidden_size, "embed", "embed", init_std=cfg.initializer_range,
                            compute_dtype=cfg.compute_dtype)
        self.tanh = ops.Tanh()

    def construct(self, hidden):
        return self.tanh(self.dense(hidden[:, 0]))                                     # (B, H)

    def shard(self, sharder):
        sharder.shard(self.tanh, "tanh", ("batch", "embed"))


class _BertBase(_HFInputs, nn.Cell):
    """Shared by every BERT cell: the config, and BERT's weight initialisation (Devlin et al. / HF)."""

    def init_weights(self, seed: int | None = None, names=None) -> None:
        """Re-draw weights deterministically: matrices N(0, initializer_range), biases 0, LayerNorm 1/0, and the
        padding row of the word embeddings 0 (as Hugging Face's ``_init_weights`` does).

        Each parameter has its own generator ``default_rng([seed, crc32(name)])``, so a parameter's value does not
        depend on which others are drawn; ``names`` restricts the draw to those parameters. ``seed=None`` takes the
        seed from numpy's global generator (reproducible under ``np.random.seed``, which the trainer sets).
        """
        seed = int(np.random.randint(0, 2**31 - 1)) if seed is None else int(seed)
        std = self.config.initializer_range
        params = dict(self.parameters_and_names())
        if names is not None:
            unknown = sorted(set(names) - set(params))
            if unknown:
                raise ValueError(f"init_weights: no parameter(s) {unknown} in {type(self).__name__}")
            params = {n: params[n] for n in params if n in set(names)}
        for name, p in params.items():
            shape = tuple(p.shape)
            leaf = name.rsplit(".", 2)
            if len(shape) >= 2:
                rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
                value = rng.normal(0.0, std, size=shape).astype(np.float32)
                if name.endswith("word_embeddings.weight"):
                    value[self.config.pad_token_id] = 0.0
            elif leaf[-1] == "weight" and len(leaf) > 1 and leaf[-2].endswith("norm"):
                value = np.ones(shape, np.float32)
            else:
                value = np.zeros(shape, np.float32)
            p.set_data(Tensor(value))


class BertModel(_BertBase):
    """The BERT encoder: ``construct(input_ids, token_type_ids=None, attention_mask=None)`` ->
    ``(last_hidden_state (B, S, H), pooler_output (B, H))``, or only ``last_hidden_state`` without a pooler."""

    def __init__(self, cfg, add_pooling_layer: bool = True):
        super().__init__()
        check_bert_config(cfg)
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        blocks = []
        for _ in range(cfg.num_layers):
            # BERT drops out the FFN output (the block does), not the intermediate activation: no inner dropout.
            ffn = FeedForward(cfg.hidden_size, cfg.ffn_hidden_size, cfg.activation, has_bias=cfg.use_bias,
                              dropout_rate=0.0, init_std=cfg.initializer_range, compute_dtype=cfg.compute_dtype)
            blocks.append(TransformerBlock(cfg, ffn=ffn))
        self.layers = nn.CellList(blocks)
        self.add_pooling_layer = add_pooling_layer
        self.pooler = BertPooler(cfg) if add_pooling_layer else None
        self.output_names = ("last_hidden_state", "pooler_output") if add_pooling_layer else ("last_hidden_state",)

    def encode(self, input_ids, token_type_ids=None, attention_mask=None):
        """Last hidden state (B, S, H) of the encoder."""
        b, s = input_ids.shape
        if token_type_ids is None:
            token_type_ids = ops.zeros_like(input_ids)
        if attention_mask is None:
            key_mask = ops.ones((b, s), ms.float32)
        else:
            key_mask = ops.cast(attention_mask, ms.float32)                          # (B, S)
        positions = ops.broadcast_to(ops.arange(0, s, 1, dtype=ms.int32), (b, s))    # (B, S)
        x = self.embeddings(input_ids, token_type_ids, positions)                   # (B, S, H)
        for block in self.layers:
            x = block(x, key_mask, positions)[0]                                      # (B, S, H); no aux (dense)
        return x

    def construct(self, input_ids, token_type_ids=None, attention_mask=None):
        x = self.encode(input_ids, token_type_ids, attention_mask)
        if self.add_pooling_layer:
            return x, self.pooler(x)
        return (x,)


class BertModelWithoutPooler(BertModel):
    """``BertModel(cfg, add_pooling_layer=False)`` as a class of its own, so that a checkpoint without a pooler is
    rebuilt by ``cls(cfg)`` like every other model; exported as Hugging Face ``BertModel``."""

    def __init__(self, cfg):
        super().__init__(cfg, add_pooling_layer=False)


class BertLMHead(nn.Cell):
    """MLM head: dense + activation + LayerNorm, then logits against the (tied) word embeddings + a vocab bias."""

    def __init__(self, cfg):
        super().__init__()
        self.dense = Linear(cfg.hidden_size, cfg.hidden_size, "embed", "embed", init_std=cfg.initializer_range,
                            compute_dtype=cfg.compute_dtype)
        self.act = Activation(cfg.activation)
        self.norm = LayerNorm(cfg.hidden_size, cfg.norm_eps)
        self.tied = cfg.tie_word_embeddings
        self.decoder = (None if self.tied else
                        normal_param((cfg.vocab_size, cfg.hidden_size), cfg.initializer_range, "decoder"))
        self.bias = Parameter(Tensor(np.zeros((cfg.vocab_size,), np.float32)), name="bias")
        self.compute_dtype = ms_dtype(cfg.compute_dtype)
        self.hidden = cfg.hidden_size
        self.matmul = ops.MatMul(transpose_b=True)
        self.blas = blas_product(self.compute_dtype)                       # CPU float32: see layers/linear.py
        self.add = ops.Add()

    def construct(self, hidden, word_embeddings):
        """hidden (..., H), word_embeddings (V, H) -> logits (..., V) float32."""
        h = self.norm(self.act(self.dense(hidden)))                                 # (..., H)
        lead = h.shape[:-1]
        h2 = ops.reshape(h, (-1, self.hidden))                                      # (N, H)
        w = word_embeddings if self.tied else self.decoder
        if self.blas is not None and h2.shape[0] >= BLAS_MIN_ROWS:
            logits = self.blas(h2, w, self.bias)                                    # (N, V), bias added
        else:
            logits = self.matmul(ops.cast(h2, self.compute_dtype), ops.cast(w, self.compute_dtype))  # (N, V)
            logits = self.add(ops.cast(logits, ms.float32), self.bias)              # (N, V)
        return ops.reshape(logits, lead + (logits.shape[-1],))                     # (..., V)

    def shard(self, sharder):
        sharder.shard(self.matmul, "matmul", ("batch", "embed"), ("vocab", "embed"))
        sharder.shard(self.add, "add", ("batch", "vocab"), ("vocab",))


class BertForPreTraining(_BertBase):
    """BERT with the masked-LM head (tied to the word embeddings) and the next-sentence head.

    ``construct`` -> ``(prediction_logits (B, S, V), seq_relationship_logits (B, 2))``; the training loss
    (:class:`BertPreTrainingLoss`) runs the MLM head only at the ``max_predictions_per_seq`` masked positions.
    """

    output_names = ("prediction_logits", "seq_relationship_logits")

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.bert = BertModel(cfg, add_pooling_layer=True)
        self.mlm_head = BertLMHead(cfg)
        self.nsp_head = Linear(cfg.hidden_size, 2, "embed", "classes", init_std=cfg.initializer_range,
                               compute_dtype=cfg.compute_dtype)

    def word_embeddings(self):
        return self.bert.embeddings.word_embeddings.weight

    def construct(self, input_ids, token_type_ids=None, attention_mask=None):
        out = self.bert(input_ids, token_type_ids, attention_mask)
        logits = self.mlm_head(out[0], self.bert.embeddings.word_embeddings.weight)  # (B, S, V)
        return logits, self.nsp_head(out[1])                                         # (B, S, V), (B, 2)


class BertForSequenceClassification(_BertBase):
    """Single-sentence or sentence-pair (segments via ``token_type_ids``) classification from the pooled [CLS]:
    ``logits (B, num_labels)``."""

    output_names = ("logits",)

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.bert = BertModel(cfg, add_pooling_layer=True)
        self.drop = dropout(cfg.dropout)
        self.classifier = Linear(cfg.hidden_size, cfg.num_labels, "embed", "classes",
                                 init_std=cfg.initializer_range, compute_dtype=cfg.compute_dtype)

    def construct(self, input_ids, token_type_ids=None, attention_mask=None):
        out = self.bert(input_ids, token_type_ids, attention_mask)
        return (self.classifier(self.drop(out[1])),)                                 # (B, C)


class BertForTokenClassification(_BertBase):
    """Token tagging (NER-style): ``logits (B, S, num_labels)`` from every token's last hidden state."""

    output_names = ("logits",)

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.bert = BertModel(cfg, add_pooling_layer=False)
        self.drop = dropout(cfg.dropout)
        self.classifier = Linear(cfg.hidden_size, cfg.num_labels, "embed", "classes",
                                 init_std=cfg.initializer_range, compute_dtype=cfg.compute_dtype)

    def construct(self, input_ids, token_type_ids=None, attention_mask=None):
        out = self.bert(input_ids, token_type_ids, attention_mask)
        return (self.classifier(self.drop(out[0])),)                                 # (B, S, C)


class BertForQuestionAnswering(_BertBase):
    """SQuAD-style extractive QA: per-token span ``start_logits`` and ``end_logits`` (B, S)."""

    output_names = ("start_logits", "end_logits")

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.bert = BertModel(cfg, add_pooling_layer=False)
        self.qa_outputs = Linear(cfg.hidden_size, 2, "embed", "classes", init_std=cfg.initializer_range,
                                 compute_dtype=cfg.compute_dtype)

    def construct(self, input_ids, token_type_ids=None, attention_mask=None):
        out = self.bert(input_ids, token_type_ids, attention_mask)
        logits = self.qa_outputs(out[0])                                             # (B, S, 2)
        return logits[:, :, 0], logits[:, :, 1]                                      # (B, S), (B, S)


# ----------------------------------------------------------------------------------------------------------------
# losses and evaluation cells (graph-friendly: plain tensors in, tensors out)
# ----------------------------------------------------------------------------------------------------------------
def _weighted_ce(logits, labels, weights):
    """sum(w * CE) / max(sum(w), 1) over the leading axis; logits (N, C), labels (N,), weights (N,)."""
    logp = ops.log_softmax(ops.cast(logits, ms.float32), -1)                        # (N, C)
    nll = -ops.gather_elements(logp, 1, ops.expand_dims(ops.cast(labels, ms.int32), -1))[:, 0]  # (N,)
    w = ops.cast(weights, ms.float32)
    return ops.sum(nll * w) / ops.maximum(ops.sum(w), 1.0)


def _gather_positions(hidden, positions):
    """hidden (B, S, H), positions (B, P) -> (B, P, H)."""
    b, s, h = hidden.shape
    p = positions.shape[1]
    offsets = ops.expand_dims(ops.arange(0, b, 1, dtype=ms.int32) * s, 1)          # (B, 1)
    flat = ops.reshape(ops.cast(positions, ms.int32) + offsets, (-1,))             # (B*P,)
    rows = ops.gather(ops.reshape(hidden, (b * s, h)), flat, 0)                     # (B*P, H)
    return ops.reshape(rows, (b, p, h))                                             # (B, P, H)


class BertPreTrainingLoss(nn.Cell):
    """Masked-LM cross entropy over the weighted prediction slots + next-sentence cross entropy (BERT's sum)."""

    def __init__(self, model: BertForPreTraining):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, input_ids, token_type_ids, attention_mask, masked_lm_positions, masked_lm_ids,
                  masked_lm_weights, next_sentence_labels):
        out = self.model.bert(input_ids, token_type_ids, attention_mask)
        picked = _gather_positions(out[0], masked_lm_positions)                      # (B, P, H)
        logits = self.model.mlm_head(picked, self.model.bert.embeddings.word_embeddings.weight)  # (B, P, V)
        v = logits.shape[-1]
        mlm = _weighted_ce(ops.reshape(logits, (-1, v)), ops.reshape(masked_lm_ids, (-1,)),
                           ops.reshape(masked_lm_weights, (-1,)))
        nsp_logits = self.model.nsp_head(out[1])                                     # (B, 2)
        nsp = _weighted_ce(nsp_logits, next_sentence_labels, ops.ones_like(ops.cast(next_sentence_labels,
                                                                                      ms.float32)))
        return mlm + nsp


class BertPreTrainingEval(nn.Cell):
    """Predictions for evaluation: MLM argmax at the prediction slots (B, P) and NSP argmax (B,)."""

    def __init__(self, model: BertForPreTraining):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, input_ids, token_type_ids, attention_mask, masked_lm_positions):
        out = self.model.bert(input_ids, token_type_ids, attention_mask)
        picked = _gather_positions(out[0], masked_lm_positions)                      # (B, P, H)
        logits = self.model.mlm_head(picked, self.model.bert.embeddings.word_embeddings.weight)  # (B, P, V)
        nsp_logits = self.model.nsp_head(out[1])                                     # (B, 2)
        return ops.argmax(logits, -1), ops.argmax(nsp_logits, -1)


class BertClassificationLoss(nn.Cell):
    """Cross entropy of a :class:`BertForSequenceClassification` on integer labels (B,)."""

    def __init__(self, model: BertForSequenceClassification):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, input_ids, token_type_ids, attention_mask, labels):
        logits = self.model(input_ids, token_type_ids, attention_mask)[0]            # (B, C)
        return _weighted_ce(logits, labels, ops.ones_like(ops.cast(labels, ms.float32)))


class BertTokenClassificationLoss(nn.Cell):
    """Cross entropy of a :class:`BertForTokenClassification` over tokens with ``label_weights`` 1 (B, S)."""

    def __init__(self, model: BertForTokenClassification):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, input_ids, token_type_ids, attention_mask, labels, label_weights):
        logits = self.model(input_ids, token_type_ids, attention_mask)[0]            # (B, S, C)
        c = logits.shape[-1]
        return _weighted_ce(ops.reshape(logits, (-1, c)), ops.reshape(labels, (-1,)),
                            ops.reshape(label_weights, (-1,)))


class BertSpanLoss(nn.Cell):
    """SQuAD loss: mean of the start and end position cross entropies (Devlin et al. section 4.2)."""

    def __init__(self, model: BertForQuestionAnswering):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, input_ids, token_type_ids, attention_mask, start_positions, end_positions):
        out = self.model(input_ids, token_type_ids, attention_mask)
        ones = ops.ones_like(ops.cast(start_positions, ms.float32))                 # (B,)
        start = _weighted_ce(out[0], start_positions, ones)
        end = _weighted_ce(out[1], end_positions, ones)
        return (start + end) / 2.0


def bert_flops_per_token(cfg, seq_length: int, predictions_per_token: float = 1.0) -> float:
    """Training FLOPs per token (forward + backward = 3x forward, 2 FLOPs per multiply-add): encoder matmuls,
    attention scores/values, and the MLM head on ``predictions_per_token`` of the tokens."""
    h, f, L, v = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_layers, cfg.vocab_size
    encoder = L * (4 * h * h + 2 * h * f + 2 * h * seq_length)
    head = predictions_per_token * (h * h + h * v)
    return 6.0 * (encoder + head)
