"""Causal-LM pre-training data and the ``data.task: causal_lm`` trainer task.

* **Tokenizer**: ``data.tokenizer`` (a folder with ``vocab.json`` + ``merges.txt``, or a ``tokenizer.json``), or a
  byte-level BPE of ``model.vocab_size`` tokens trained on the training documents (:mod:`ms_llm.data.bpe`). It is
  saved to ``<train.output_dir>/tokenizer/`` so that ``ms-llm generate`` can decode with it later.
* **Documents**: the corpus (``data.corpus``, default the shipped *Persuasion* vol. I, one document per chapter) is
  read with :func:`ms_llm.data.corpus.read_documents`; the **last document is held out** for evaluation.
* **Packing** (as GPT-2/3): each document's tokens followed by ``<|endoftext|>``, all concatenated into one stream and
  cut into fixed windows of ``seq_length + 1`` tokens (input = window[:-1], labels = window[1:]); attention is not
  reset at document boundaries. Epoch ``e`` starts the cut at an offset drawn from ``(seed, e)`` and visits the
  windows in an order drawn from ``(seed, e)``, so batches are a pure function of ``(seed, step)`` (exact resume).
* **Evaluation**: mean token cross-entropy and perplexity ``exp(loss)`` over non-overlapping windows of the
  held-out document, plus the held-out cross-entropy of a unigram model of the training tokens (add-one smoothed)
  as the baseline a language model has to beat.
"""
from __future__ import annotations

import os
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from ..moe.layer import moe_log_metrics
from ..training.losses import cross_entropy
from .bpe import BPETokenizer
from .corpus import default_corpus, read_documents

IGNORE = -100   # label value excluded from the loss


# ------------------------------------------------------------------------------------------------------------------
# packing and batches
# ------------------------------------------------------------------------------------------------------------------
def pack_documents(docs: Sequence[Sequence[int]], eos_id: int) -> np.ndarray:
    """One int32 stream: every document's ids followed by ``eos_id``."""
    parts = []
    for d in docs:
        parts.append(np.asarray(d, np.int32))
        parts.append(np.array([eos_id], np.int32))
    return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


def windows(stream: np.ndarray, width: int, offset: int = 0) -> np.ndarray:
    """Non-overlapping windows ``(N, width)`` of ``stream[offset:]`` (the incomplete tail is dropped)."""
    n = (len(stream) - offset) // width
    return stream[offset:offset + n * width].reshape(n, width)                 # (N, width)


class PackedLM:
    """Training stream and held-out stream of token ids, with deterministic resumable batches."""

    def __init__(self, train_stream: np.ndarray, eval_stream: np.ndarray, seq_length: int, seed: int):
        self.train, self.eval, self.seq_length, self.seed = train_stream, eval_stream, seq_length, seed
        self.width = seq_length + 1
        # windows per epoch, the same for every offset in [0, width)
        self.per_epoch = (len(train_stream) - seq_length) // self.width
        if self.per_epoch < 1:
            raise ValueError(f"data.seq_length={seq_length}: the training text has only {len(train_stream)} tokens, "
                             f"fewer than one window of {self.width}")
        if len(eval_stream) < self.width:
            raise ValueError(f"data.seq_length={seq_length}: the held-out document has only {len(eval_stream)} "
                             f"tokens, fewer than one window of {self.width}")
        self._epoch_cache: Tuple[int, Optional[np.ndarray]] = (-1, None)
        self.prompt = ""              # text that starts generation samples (set by load_tokenizer_and_data)

    def epoch_windows(self, epoch: int) -> np.ndarray:
        """(per_epoch, width) windows of epoch ``epoch`` in visiting order."""
        if self._epoch_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, 104729, epoch])
            offset = int(rng.integers(0, self.width))
            w = windows(self.train, self.width, offset)[: self.per_epoch]     # (per_epoch, width)
            self._epoch_cache = (epoch, w[rng.permutation(self.per_epoch)])
        return self._epoch_cache[1]

    def batch(self, step: int, batch_size: int) -> Tuple[np.ndarray, np.ndarray]:
        """(input_ids, labels), both (batch_size, seq_length) int32, of global step ``step``."""
        idx = np.arange(step * batch_size, (step + 1) * batch_size)
        rows = np.stack([self.epoch_windows(int(i // self.per_epoch))[int(i % self.per_epoch)] for i in idx])
        return rows[:, :-1].copy(), rows[:, 1:].copy()                          # (B, S), (B, S)

    def batches(self, start_step: int, batch_size: int) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        step = start_step
        while True:
            yield self.batch(step, batch_size)
            step += 1

    def eval_batches(self, batch_size: int) -> List[Tuple[np.ndarray, np.ndarray]]:
        """Held-out windows in batches of exactly ``batch_size`` rows; rows beyond the data have IGNORE labels."""
        w = windows(self.eval, self.width)                                      # (N, width)
        out = []
        for i in range(0, len(w), batch_size):
            rows = w[i:i + batch_size]
            ids, labels = rows[:, :-1], rows[:, 1:]
            if len(rows) < batch_size:
                fill = batch_size - len(rows)
                ids = np.concatenate([ids, np.zeros((fill, self.seq_length), np.int32)])
                labels = np.concatenate([labels, np.full((fill, self.seq_length), IGNORE, np.int32)])
            out.append((ids.astype(np.int32), labels.astype(np.int32)))
        return out

    def unigram_loss(self, vocab_size: int) -> float:
        """Held-out cross-entropy (nats/token) of the add-one smoothed unigram distribution of the training stream."""
        counts = np.bincount(self.train, minlength=vocab_size).astype(np.float64) + 1.0
        logp = np.log(counts / counts.sum())
        tokens = windows(self.eval, self.width)[:, 1:].reshape(-1)             # the evaluated label tokens
        return float(-logp[tokens].mean())


# ------------------------------------------------------------------------------------------------------------------
# loss cell
# ------------------------------------------------------------------------------------------------------------------
class CausalLMLoss(nn.Cell):
    """Mean next-token cross entropy over labels != IGNORE (labels are already shifted), plus the MoE aux loss."""

    def __init__(self, model, label_smoothing: float = 0.0):
        super().__init__(auto_prefix=False)
        self.model = model
        self.smoothing = label_smoothing
        self.has_aux = getattr(model, "has_aux", False)

    def construct(self, input_ids, labels):
        if self.has_aux:
            logits, aux = self.model(input_ids)                                # (B, S, V), ()
        else:
            logits = self.model(input_ids)                                     # (B, S, V)
            aux = 0.0
        v = logits.shape[-1]
        flat = ops.reshape(labels, (-1,))                                      # (B*S,)
        mask = ops.cast(flat >= 0, ms.float32)                                 # (B*S,)
        loss = cross_entropy(ops.reshape(logits, (-1, v)), ops.maximum(flat, 0), mask, self.smoothing)
        return loss + aux


class _TokenNLL(nn.Cell):
    """(summed token NLL, token count) of a batch, for exact held-out averages."""

    def __init__(self, model):
        super().__init__(auto_prefix=False)
        self.model = model
        self.has_aux = getattr(model, "has_aux", False)

    def construct(self, input_ids, labels):
        if self.has_aux:
            logits, _ = self.model(input_ids)
        else:
            logits = self.model(input_ids)                                     # (B, S, V)
        v = logits.shape[-1]
        flat = ops.reshape(labels, (-1,))                                      # (B*S,)
        mask = ops.cast(flat >= 0, ms.float32)                                 # (B*S,)
        logp = ops.log_softmax(ops.reshape(logits, (-1, v)), -1)               # (B*S, V)
        nll = -ops.gather_elements(logp, 1, ops.expand_dims(ops.maximum(flat, 0), -1))[:, 0]   # (B*S,)
        return ops.sum(nll * mask), ops.sum(mask)


# ------------------------------------------------------------------------------------------------------------------
# the task
# ------------------------------------------------------------------------------------------------------------------
def gpt_flops_per_token(cfg, seq_length: int) -> float:
    """Training FLOPs per token: 6 x (matmul weights touched per token, output head included) + 3 x the forward
    attention score / value matmuls (2 x 2 x S x heads x head_dim per layer; the causal half is not discounted).

    In MoE layers (GLaM) a token touches the router (hidden x experts) and ``top_k`` experts of
    ``moe.expert_ffn_hidden_size`` with ``moe.expert_activation`` (gated or plain), not the dense FFN: the activated
    FLOPs, as in the MoE papers' FLOPs-per-token accounting (dropped tokens are not discounted)."""
    h, f, nl = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_layers
    d_attn, d_kv = cfg.num_heads * cfg.dim_per_head, cfg.kv_heads * cfg.dim_per_head
    moe = cfg.moe
    dense_ffn = (3 if cfg.is_gated else 2) * h * f
    expert_mats = (3 if (moe.expert_activation or cfg.activation) in ("swiglu", "geglu", "reglu") else 2) * h * \
        (moe.expert_ffn_hidden_size or f)
    ffn = [moe.top_k * expert_mats + h * moe.num_experts if moe.num_experts and moe.is_moe_layer(i) else dense_ffn
           for i in range(nl)]
    mats = nl * (2 * h * d_attn + 2 * h * d_kv) + sum(ffn) + h * cfg.vocab_size
    return 6.0 * mats + 3.0 * nl * 4.0 * seq_length * d_attn


def is_hf_dir(path: Optional[str]) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "config.json")) and \
        os.path.isfile(os.path.join(path, "model.safetensors"))


def load_tokenizer_and_data(cfg) -> Tuple[BPETokenizer, PackedLM]:
    """Tokenizer (loaded or trained on the training documents) and the packed train / held-out streams."""
    m, d, t = cfg.model, cfg.data, cfg.train
    docs = ["\n".join(lines) for lines in read_documents(d.corpus or default_corpus())]
    if len(docs) < 2:
        raise ValueError(f"data.corpus: {len(docs)} document(s); causal-LM pre-training holds the last document "
                         f"out for evaluation, so it needs at least 2 (separated by empty lines)")
    train_docs, eval_docs = docs[:-1], docs[-1:]
    tok = BPETokenizer.load(d.tokenizer) if d.tokenizer else BPETokenizer.train(train_docs, m.vocab_size)
    if tok.vocab_size > m.vocab_size:
        raise ValueError(f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's {tok.vocab_size} tokens")
    if tok.eos_id != m.eos_token_id:
        raise ValueError(f"model.eos_token_id={m.eos_token_id} but the tokenizer's <|endoftext|> is {tok.eos_id}; "
                         f"set model.eos_token_id={tok.eos_id}")
    train = pack_documents(tok.encode_batch(train_docs), tok.eos_id)
    held = pack_documents(tok.encode_batch(eval_docs), tok.eos_id)
    data = PackedLM(train, held, d.seq_length, t.seed)
    cut = eval_docs[0].find(" ", 24)
    data.prompt = eval_docs[0][:cut] if cut > 0 else eval_docs[0][:24]   # start of the held-out text
    return tok, data


def build_causal_lm_task(cfg):
    """``data.task: causal_lm`` — pre-train (or, with ``train.init_from`` a Hugging Face GPT-2 / Llama directory,
    fine-tune) a decoder-only LM on the corpus; evaluate reports held-out loss and perplexity, sample a generation."""
    from ..models import build_model
    from ..training.task import Task
    m, d, t = cfg.model, cfg.data, cfg.train
    tok, data = load_tokenizer_and_data(cfg)
    tok.save(os.path.join(t.output_dir, "tokenizer"))
    model = build_model(m)
    initialized_from = None
    if t.init_from and is_hf_dir(t.init_from):
        from ..checkpoint.hf_gpt2 import read_hf_dir
        hf, weights = read_hf_dir(t.init_from)
        conv = _converter(hf.get("model_type"))
        conv.load_into(model, weights, source=t.init_from)
        initialized_from = t.init_from
    elif hasattr(model, "init_weights"):
        model.init_weights(t.seed)
    loss_net = CausalLMLoss(model, t.label_smoothing)
    nll_net = _TokenNLL(model)
    unigram = data.unigram_loss(tok.vocab_size)
    eval_batches = data.eval_batches(t.micro_batch_size)

    def evaluate(net):
        net.set_train(False)
        scorer = nll_net if net is model else _TokenNLL(net)
        total, count = 0.0, 0.0
        for ids, labels in eval_batches:
            s, n = scorer(Tensor(ids), Tensor(labels))
            total += float(s.asnumpy())
            count += float(n.asnumpy())
        loss = total / count
        return {"loss": loss, "perplexity": float(np.exp(loss)), "unigram_loss": unigram}

    def sample(net, max_new_tokens: int = 80):
        prompt = np.array([tok.encode(data.prompt)])                        # (1, P)
        if m.position_embedding != "none":
            max_new_tokens = min(max_new_tokens, m.max_position_embeddings - prompt.shape[1])
        out = net.generate(prompt, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.8,
                           top_k=40, seed=t.seed, eos_token_id=None)
        return f"sample (prompt: the held-out text's start; temperature 0.8, top-k 40):\n{tok.decode(out[0])}"

    return Task(model=model, loss_net=loss_net, batches=lambda start: data.batches(start, t.batch_size),
                evaluate=evaluate, tokens_per_batch=t.batch_size * d.seq_length,
                flops_per_token=gpt_flops_per_token(m, d.seq_length), sample=sample,
                initialized_from=initialized_from,
                log_metrics=moe_log_metrics if m.moe.num_experts > 0 else None)


def _converter(model_type):
    if model_type == "gpt2":
        from ..checkpoint import hf_gpt2
        return hf_gpt2
    if model_type == "llama":
        from ..checkpoint import hf_llama
        return hf_llama
    raise ValueError(f"train.init_from: Hugging Face model_type '{model_type}' is not a decoder ms_llm loads "
                     f"(gpt2, llama)")
