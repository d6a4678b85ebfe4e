"""BERT data: MLM + NSP pre-training examples on ``mindspore.dataset``, and the fine-tuning classification task.

Pre-training follows ``create_pretraining_data.py`` of Devlin et al. (2018):
* a document is a list of sentences; an example takes sentences from a random place in a document until it reaches
  the target length (``seq_length - 3`` tokens, or with probability ``SHORT_SEQ_PROB`` a random shorter length),
  splits them at a random point into segment A and B; with probability ``nsp_probability`` (or if there is only one
  sentence) B is replaced by sentences from a random start in another document (label 1 = random next, 0 = actual
  next, Hugging Face's convention); the pair is truncated (randomly from the front or the back of the longer
  segment) to fit ``[CLS] A [SEP] B [SEP]``. One deviation: the chunk always takes a second sentence when the
  document has one (BERT stops at the target length, and forces 'random next' for a one-sentence chunk, which at
  short lengths and long sentences skews the labels to ~66% random); so the label rate is ``nsp_probability``;
* masking: ``mlm_probability`` of the tokens (at least one, at most ``max_predictions_per_seq``), [CLS]/[SEP]
  excluded, chosen as single word pieces or, with ``whole_word_masking``, whole words (a piece and its ``##``
  continuations); each chosen token becomes [MASK] with probability 0.8, stays itself 0.1, a random non-special
  token 0.1;
* every example is a fixed-shape tuple: ``input_ids, token_type_ids, attention_mask (S,)``,
  ``masked_lm_positions, masked_lm_ids (P,)`` (padded with 0), ``masked_lm_weights (P,)`` (1.0 real, 0.0 padding),
  ``next_sentence_labels ()``.

Unlike the original (a fixed set of ``dupe_factor`` maskings written to disk), example ``n`` is drawn from its own
generator ``default_rng([seed, stream, n])``: the stream is endless, masks differ between epochs (dynamic masking),
and any step's batch can be rebuilt without the ones before it, which is what resuming needs.
"""
from __future__ import annotations

import math
import os
import re
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..checkpoint.hf_bert import resolve_path
from .corpus import default_corpus, read_documents
from .wordpiece import WordPiece, load_tokenizer

SHORT_SEQ_PROB = 0.1          # BERT: fraction of examples with a random shorter target length
PRETRAIN_COLUMNS = ("input_ids", "token_type_ids", "attention_mask", "masked_lm_positions", "masked_lm_ids",
                    "masked_lm_weights", "next_sentence_labels")
CLASSIFICATION_COLUMNS = ("input_ids", "token_type_ids", "attention_mask", "labels")
TRAIN_STREAM, EVAL_STREAM = 0, 1

_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "sr", "jr", "esq", "rev", "col", "capt", "gen", "lt", "prof", "no",
                  "vol", "ch", "viz", "etc", "vs", "co"}
_SENT_END = re.compile(r"""([.!?]+["')\]]*)(\s+)(?=["'(\[]?[A-Z0-9])""")


def split_sentences(paragraph: str) -> List[str]:
    """Split at '.', '!' or '?' (plus closing quotes) followed by space and a capital, except after common
    abbreviations (Mr., Mrs., Dr., ...) and single initials."""
    out, start = [], 0
    for m in _SENT_END.finditer(paragraph):
        end = m.end(1)
        words = paragraph[start:m.start(1)].split()
        last = words[-1].lower().strip("\"'(") if words else ""
        if m.group(1) == "." and (last in _ABBREVIATIONS or (len(last) == 1 and last.isalpha())):
            continue
        out.append(paragraph[start:end].strip())
        start = m.end()
    tail = paragraph[start:].strip()
    if tail:
        out.append(tail)
    return [s for s in out if s]


def tokenize_documents(docs: Sequence[Sequence[str]], tok: WordPiece) -> List[List[List[int]]]:
    """Documents of paragraphs -> documents of tokenised sentences (empty sentences dropped, documents with fewer
    than two sentences dropped)."""
    out = []
    for doc in docs:
        sents = [s for p in doc for s in split_sentences(p)]
        ids = [e.ids for e in tok.tok.encode_batch(sents, add_special_tokens=False)] if sents else []
        ids = [x for x in ids if x]
        if len(ids) >= 2:
            out.append(ids)
    return out


class PretrainingData:
    """Deterministic MLM + NSP example generator over tokenised documents (see the module docstring)."""

    def __init__(self, train_docs: List[List[List[int]]], eval_docs: List[List[List[int]]], tok: WordPiece,
                 seq_length: int, max_predictions: int, mlm_probability: float = 0.15,
                 nsp_probability: float = 0.5, whole_word_masking: bool = False, seed: int = 0,
                 short_seq_prob: float = SHORT_SEQ_PROB):
        if seq_length < 8:
            raise ValueError(f"data.seq_length={seq_length}: BERT examples need at least 8 tokens")
        if len(train_docs) < 2:
            raise ValueError(f"the corpus gives {len(train_docs)} training document(s) with 2+ sentences; next "
                             f"sentence prediction needs at least 2 (separate documents by empty lines)")
        if not eval_docs:
            raise ValueError("no held-out document for evaluation (the corpus needs at least 3 documents)")
        if max_predictions > seq_length - 3:
            raise ValueError(f"data.max_predictions_per_seq={max_predictions} exceeds the maskable tokens "
                             f"(seq_length - 3 = {seq_length - 3})")
        self.train_docs, self.eval_docs, self.tok = train_docs, eval_docs, tok
        self.seq_length, self.max_predictions = seq_length, max_predictions
        self.mlm_probability, self.nsp_probability = mlm_probability, nsp_probability
        self.whole_word_masking, self.seed, self.short_seq_prob = whole_word_masking, seed, short_seq_prob
        v = tok.vocab_size
        self.continuation = np.array([tok.is_continuation(i) for i in range(v)], bool)
        self.random_ids = np.array([i for i in range(v) if i not in tok.special_ids], np.int64)
        # documents are picked in proportion to their sentence count
        self._weights = {}
        for name, docs in (("train", train_docs), ("eval", eval_docs)):
            w = np.array([len(d) for d in docs], np.float64)
            self._weights[name] = w / w.sum()

    # --- one example ------------------------------------------------------------------------------------------
    def example(self, index: int, stream: int = TRAIN_STREAM) -> Tuple[np.ndarray, ...]:
        """Example ``index`` of a stream (TRAIN_STREAM from the training documents, EVAL_STREAM from the held-out
        ones; random next sentences always come from another training document)."""
        rng = np.random.default_rng([self.seed, stream, index])
        docs = self.train_docs if stream == TRAIN_STREAM else self.eval_docs
        d = int(rng.choice(len(docs), p=self._weights["train" if stream == TRAIN_STREAM else "eval"]))
        tokens_a, tokens_b, is_random = self._pair(rng, docs, d, exclude_train=d if stream == TRAIN_STREAM else -1)
        ids, types = self.tok.encode_pair(tokens_a, tokens_b)
        ids, positions, labels = self._mask(rng, ids)
        s, p = self.seq_length, self.max_predictions
        input_ids = np.full((s,), self.tok.pad_id, np.int32)
        input_ids[:len(ids)] = ids
        token_type_ids = np.zeros((s,), np.int32)
        token_type_ids[:len(types)] = types
        attention_mask = np.zeros((s,), np.int32)
        attention_mask[:len(ids)] = 1
        lm_positions = np.zeros((p,), np.int32)
        lm_positions[:len(positions)] = positions
        lm_ids = np.zeros((p,), np.int32)
        lm_ids[:len(labels)] = labels
        lm_weights = np.zeros((p,), np.float32)
        lm_weights[:len(labels)] = 1.0
        return (input_ids, token_type_ids, attention_mask, lm_positions, lm_ids, lm_weights,
                np.array(int(is_random), np.int32))

    def _pair(self, rng, docs, d: int, exclude_train: int):
        doc = docs[d]
        max_tokens = self.seq_length - 3
        target = max_tokens
        if rng.random() < self.short_seq_prob:
            target = int(rng.integers(2, max_tokens + 1))
        start = int(rng.integers(0, len(doc)))
        chunk, length, i = [], 0, start
        while i < len(doc):
            chunk.append(doc[i])
            length += len(doc[i])
            if length >= target and len(chunk) >= 2:
                break
            i += 1
        a_end = int(rng.integers(1, len(chunk))) if len(chunk) >= 2 else 1
        tokens_a = [t for sent in chunk[:a_end] for t in sent]
        if len(chunk) == 1 or rng.random() < self.nsp_probability:
            is_random = True
            target_b = max(1, target - len(tokens_a))
            others = [k for k in range(len(self.train_docs)) if k != exclude_train]
            other = self.train_docs[others[int(rng.integers(0, len(others)))]]
            j = int(rng.integers(0, len(other)))
            tokens_b = []
            while j < len(other) and len(tokens_b) < target_b:
                tokens_b.extend(other[j])
                j += 1
        else:
            is_random = False
            tokens_b = [t for sent in chunk[a_end:] for t in sent]
        tokens_a, tokens_b = list(tokens_a), list(tokens_b)
        while len(tokens_a) + len(tokens_b) > max_tokens:
            longer = tokens_a if len(tokens_a) > len(tokens_b) else tokens_b
            if rng.random() < 0.5:
                del longer[0]
            else:
                longer.pop()
        if not tokens_b:  # a one-token budget left nothing for B: take it from A
            tokens_b = [tokens_a.pop()]
        return tokens_a, tokens_b, is_random

    def _mask(self, rng, ids: List[int]):
        special = (self.tok.cls_id, self.tok.sep_id)
        cands: List[List[int]] = []
        for i, t in enumerate(ids):
            if t in special:
                continue
            if self.whole_word_masking and cands and self.continuation[t] and cands[-1][-1] == i - 1:
                cands[-1].append(i)
            else:
                cands.append([i])
        order = rng.permutation(len(cands))
        n_predict = min(self.max_predictions, max(1, int(round(len(ids) * self.mlm_probability))))
        out = list(ids)
        chosen: List[int] = []
        for k in order:
            group = cands[k]
            if len(chosen) >= n_predict:
                break
            if len(chosen) + len(group) > n_predict:
                continue
            for i in group:
                r = rng.random()
                if r < 0.8:
                    out[i] = self.tok.mask_id
                elif r < 0.9:
                    pass                                   # keep the original token
                else:
                    out[i] = int(self.random_ids[int(rng.integers(0, len(self.random_ids)))])
                chosen.append(i)
        chosen.sort()
        return out, chosen, [ids[i] for i in chosen]

    # --- batches through mindspore.dataset --------------------------------------------------------------------
    def dataset(self, start: int, count: int, batch_size: int, stream: int = TRAIN_STREAM, num_workers: int = 1):
        """A ``mindspore.dataset`` pipeline of examples ``start .. start+count-1`` of a stream, in order, batched
        with ``drop_remainder`` (fixed shapes)."""
        import mindspore.dataset as ds
        source = _ExampleSource(self, start, count, stream)
        data = ds.GeneratorDataset(source, column_names=list(PRETRAIN_COLUMNS), shuffle=False,
                                   num_parallel_workers=num_workers, python_multiprocessing=False)
        return data.batch(batch_size, drop_remainder=True)

    def batches(self, start_step: int, batch_size: int, total_steps: int, num_workers: int = 1):
        """Global batches of steps ``start_step .. total_steps-1`` (step k holds examples k*B .. k*B+B-1)."""
        steps = max(total_steps - start_step, 0)
        if steps == 0:
            return iter(())
        pipe = self.dataset(start_step * batch_size, steps * batch_size, batch_size, TRAIN_STREAM, num_workers)
        return (tuple(b) for b in pipe.create_tuple_iterator(output_numpy=True, num_epochs=1))

    def eval_batches(self, num_examples: int, batch_size: int):
        """The held-out set: ceil(num_examples / batch_size) whole batches of the eval stream (plain numpy)."""
        n = math.ceil(num_examples / batch_size) * batch_size
        rows = [self.example(i, EVAL_STREAM) for i in range(n)]
        return [tuple(np.stack([r[c] for r in rows[b:b + batch_size]]) for c in range(len(PRETRAIN_COLUMNS)))
                for b in range(0, n, batch_size)]


class _ExampleSource:
    """Random-access source for ``GeneratorDataset``: item i is example ``start + i`` of a stream."""

    def __init__(self, data: PretrainingData, start: int, count: int, stream: int):
        self.data, self.start, self.count, self.stream = data, start, count, stream

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        if not 0 <= i < self.count:
            raise IndexError(i)
        return self.data.example(self.start + int(i), self.stream)


# ----------------------------------------------------------------------------------------------------------------
# tokenizer and corpus from a run config
# ----------------------------------------------------------------------------------------------------------------
def pretraining_tokenizer(cfg, texts: Sequence[str]) -> WordPiece:
    """``data.tokenizer`` (a vocab.txt or a folder with one), else a WordPiece vocabulary of ``model.vocab_size``
    trained on ``texts``; its size and [PAD] id must match the model config."""
    m, d = cfg.model, cfg.data
    tok = load_tokenizer(d.tokenizer) if d.tokenizer else WordPiece.train(texts, m.vocab_size)
    if tok.vocab_size != m.vocab_size:
        raise ValueError(f"model.vocab_size={m.vocab_size} but the tokenizer {d.tokenizer} has {tok.vocab_size} tokens")
    if tok.pad_id != m.pad_token_id:
        raise ValueError(f"model.pad_token_id={m.pad_token_id} but the tokenizer's [PAD] id is {tok.pad_id}")
    return tok


def build_pretraining_data(cfg, tok: Optional[WordPiece] = None) -> Tuple[PretrainingData, WordPiece]:
    """PretrainingData for a run config: ``data.corpus`` (default: the shipped corpus), last ~10% of the documents
    held out for evaluation."""
    d, t = cfg.data, cfg.train
    docs = read_documents(d.corpus or default_corpus())
    if len(docs) < 3:
        raise ValueError(f"data.corpus: {len(docs)} document(s); BERT pre-training needs at least 3 (separate "
                         f"documents by empty lines)")
    n_eval = max(1, len(docs) // 10)
    train_text, eval_text = docs[:-n_eval], docs[-n_eval:]
    if tok is None:
        tok = pretraining_tokenizer(cfg, [p for doc in train_text for p in doc])
    data = PretrainingData(tokenize_documents(train_text, tok), tokenize_documents(eval_text, tok), tok,
                           d.seq_length, d.max_predictions_per_seq, d.mlm_probability, d.nsp_probability,
                           d.whole_word_masking, t.seed)
    return data, tok


# ----------------------------------------------------------------------------------------------------------------
# trainer tasks
# ----------------------------------------------------------------------------------------------------------------
def _graph_runner(cell):
    """Call ``cell`` on numpy arrays (as Tensors) and return numpy outputs."""
    from mindspore import Tensor

    def run(*arrays):
        out = cell(*[Tensor(a) for a in arrays])
        if hasattr(out, "to_tuple"):
            out = out.to_tuple()                     # a ModelOutput (named outputs of a top-level call)
        out = out if isinstance(out, (tuple, list)) else (out,)
        return [o.asnumpy() for o in out]
    return run


def build_mlm_task(cfg):
    """``data.task: mlm`` — pre-train a BertForPreTraining on the corpus; evaluate reports mlm_accuracy and
    nsp_accuracy on held-out documents."""
    from ..models.bert import BertForPreTraining, BertPreTrainingEval, BertPreTrainingLoss, bert_flops_per_token
    from ..training.task import Task
    m, d, t = cfg.model, cfg.data, cfg.train
    if m.arch != "bert":
        raise ValueError(f"data.task 'mlm' needs model.arch 'bert', not '{m.arch}'")
    data, tok = build_pretraining_data(cfg)
    model = BertForPreTraining(m)
    model.init_weights(t.seed)
    loss_net = BertPreTrainingLoss(model)
    eval_net = BertPreTrainingEval(model)
    eval_batches = data.eval_batches(d.num_eval, t.micro_batch_size)
    run_eval = _graph_runner(eval_net)

    def evaluate(net):
        was_training = net.training
        net.set_train(False)
        correct = weight = nsp_correct = count = 0.0
        for batch in eval_batches:
            ids, types, mask, pos, lm_ids, lm_w, nsp = batch
            pred, nsp_pred = run_eval(ids, types, mask, pos)
            correct += float(((pred == lm_ids) * lm_w).sum())
            weight += float(lm_w.sum())
            nsp_correct += float((nsp_pred == nsp).sum())
            count += len(nsp)
        net.set_train(was_training)
        return {"mlm_accuracy": correct / max(weight, 1.0), "nsp_accuracy": nsp_correct / max(count, 1.0),
                "eval_examples": int(count)}

    def sample(net):
        was_training = net.training
        net.set_train(False)
        ids, types, mask, pos, lm_ids, lm_w, nsp = eval_batches[0]
        pred, nsp_pred = run_eval(ids, types, mask, pos)
        lines = []
        for r in range(min(2, len(ids))):
            toks = [tok.id_to_token(i) for i in ids[r][mask[r] > 0]]
            for k in range(int(lm_w[r].sum())):
                toks[pos[r, k]] = f"[{tok.id_to_token(pred[r, k])}|{tok.id_to_token(lm_ids[r, k])}]"
            lines.append(" ".join(toks) + f"\n  next sentence: predicted {'random' if nsp_pred[r] else 'actual'}, "
                         f"truth {'random' if nsp[r] else 'actual'}")
        net.set_train(was_training)
        return "masked LM on held-out text ([predicted|true] at prediction slots):\n" + "\n".join(lines)

    return Task(model=model, loss_net=loss_net,
                batches=lambda start: data.batches(start, t.batch_size, t.steps, d.num_workers),
                evaluate=evaluate, tokens_per_batch=t.batch_size * d.seq_length,
                flops_per_token=bert_flops_per_token(m, d.seq_length, d.max_predictions_per_seq / d.seq_length),
                sample=sample)


# ----------------------------------------------------------------------------------------------------------------
# fine-tuning: sentence classification
# ----------------------------------------------------------------------------------------------------------------
def is_hf_dir(path: Optional[str]) -> bool:
    return bool(path) and os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")) and \
        os.path.exists(os.path.join(path, "model.safetensors"))


_ARCH_KEYS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size", "max_position_embeddings",
              "type_vocab_size", "activation", "norm_eps", "pad_token_id")


class ClassificationData:
    """Encoded (train, test) sentences with fixed shapes and seeded, resumable batch order."""

    def __init__(self, train: Sequence[Tuple[str, int]], test: Sequence[Tuple[str, int]], tok: WordPiece,
                 seq_length: int, seed: int):
        self.seed = seed
        self.train = self._encode(train, tok, seq_length)
        self.test = self._encode(test, tok, seq_length)

    @staticmethod
    def _encode(rows, tok, seq_length):
        enc = tok.batch([r[0] for r in rows], max_length=seq_length, pad_to=seq_length)
        labels = np.array([r[1] for r in rows], np.int32)
        return tuple(enc[k].astype(np.int32) for k in CLASSIFICATION_COLUMNS[:3]) + (labels,)

    def indices(self, step: int, batch_size: int) -> np.ndarray:
        """Training example indices of a step: epochs are seeded permutations, so step k needs nothing before it."""
        n = len(self.train[0])
        first = step * batch_size
        out = []
        while len(out) < batch_size:
            epoch, offset = divmod(first + len(out), n)
            perm = np.random.default_rng([self.seed, 2, epoch]).permutation(n)
            out.extend(perm[offset:offset + batch_size - len(out)].tolist())
        return np.array(out, np.int64)

    def batches(self, start_step: int, batch_size: int, total_steps: int, num_workers: int = 1):
        import mindspore.dataset as ds
        steps = max(total_steps - start_step, 0)
        if steps == 0:
            return iter(())
        arrays = self.train

        class Source:
            def __len__(self):
                return steps * batch_size

            def __getitem__(inner, i):
                step, k = divmod(int(i), batch_size)
                j = self.indices(start_step + step, batch_size)[k]
                return tuple(a[j] for a in arrays)

        pipe = ds.GeneratorDataset(Source(), column_names=list(CLASSIFICATION_COLUMNS), shuffle=False,
                                   num_parallel_workers=num_workers, python_multiprocessing=False)
        pipe = pipe.batch(batch_size, drop_remainder=True)
        return (tuple(b) for b in pipe.create_tuple_iterator(output_numpy=True, num_epochs=1))


def build_classification_model(cfg, num_labels: int):
    """A BertForSequenceClassification: from ``train.init_from`` if it is a Hugging Face directory (its
    architecture must equal ``model``'s), else freshly initialised from ``train.seed``."""
    from ..checkpoint.hf_bert import from_pretrained, hf_to_model_config, read_hf_dir
    from ..models.bert import BertForSequenceClassification
    m, t = cfg.model, cfg.train
    if m.num_labels != num_labels:
        raise ValueError(f"model.num_labels={m.num_labels} but the task has {num_labels} labels")
    init = resolve_path(t.init_from)
    if is_hf_dir(init):
        hf_cfg = hf_to_model_config(read_hf_dir(init)[0])
        diff = [f"{k}: config {getattr(m, k)} vs {init} {getattr(hf_cfg, k)}" for k in _ARCH_KEYS
                if getattr(m, k) != getattr(hf_cfg, k)]
        if diff:
            raise ValueError("train.init_from: the model section does not match the pretrained config (" +
                             "; ".join(diff) + ")")
        model = from_pretrained(init, model_class="BertForSequenceClassification", num_labels=num_labels,
                                dropout=m.dropout, seed=t.seed)
        return model, init
    model = BertForSequenceClassification(m)
    model.init_weights(t.seed)
    return model, None


def classification_tokenizer(cfg, init_dir: Optional[str]) -> WordPiece:
    """``data.tokenizer``, else the ``vocab.txt`` of the pretrained directory."""
    path = cfg.data.tokenizer
    if path is None and init_dir is not None and os.path.exists(os.path.join(init_dir, "vocab.txt")):
        path = os.path.join(init_dir, "vocab.txt")
    if path is None:
        raise ValueError("data.tokenizer: the classification task needs a WordPiece vocab.txt (or a train.init_from "
                         "Hugging Face directory that holds one)")
    tok = load_tokenizer(path)
    if tok.vocab_size != cfg.model.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} but {path} has {tok.vocab_size} tokens")
    return tok


def build_classification_task(cfg):
    """``data.task: classification`` — fine-tune BertForSequenceClassification on the shipped topic task
    (:mod:`ms_llm.data.finetune`); ``train.init_from`` may name a Hugging Face directory (``pkg:`` paths allowed)
    to start from. evaluate reports ``accuracy`` on the test split (held-out nouns and templates) and
    ``train_accuracy`` on every 4th training sentence."""
    from ..models.bert import BertClassificationLoss, bert_flops_per_token
    from ..training.task import Task
    from .finetune import LABELS, topic_task
    m, d, t = cfg.model, cfg.data, cfg.train
    if m.arch != "bert":
        raise ValueError(f"data.task 'classification' needs model.arch 'bert', not '{m.arch}'")
    model, init_dir = build_classification_model(cfg, len(LABELS))
    tok = classification_tokenizer(cfg, init_dir)
    train, test = topic_task()
    data = ClassificationData(train, test, tok, d.seq_length, t.seed)
    loss_net = BertClassificationLoss(model)
    run = _graph_runner(model)

    train_probe = tuple(a[::4] for a in data.train)   # every 4th training sentence (360): memorisation check

    def accuracy(net, arrays, batch_size=120):
        ids, types, mask, labels = arrays
        correct = 0
        for b in range(0, len(labels), batch_size):
            logits = run(ids[b:b + batch_size], types[b:b + batch_size], mask[b:b + batch_size])[0]
            correct += int((logits.argmax(-1) == labels[b:b + batch_size]).sum())
        return correct / len(labels)

    def evaluate(net):
        was_training = net.training
        net.set_train(False)
        out = {"accuracy": accuracy(net, data.test), "train_accuracy": accuracy(net, train_probe)}
        net.set_train(was_training)
        return out

    def sample(net):
        was_training = net.training
        net.set_train(False)
        rows = np.arange(0, len(test), 3)[:120]        # one evaluation-sized batch (no new graph shape)
        logits = run(*(a[rows] for a in data.test[:3]))[0]
        net.set_train(was_training)
        return "held-out sentences:\n" + "\n".join(
            f"  {test[i][0]!r}: predicted {LABELS[int(p)]}, truth {LABELS[test[i][1]]}"
            for i, p in zip(rows, logits.argmax(-1)) if i % 45 == 0)

    return Task(model=model, loss_net=loss_net,
                batches=lambda start: data.batches(start, t.batch_size, t.steps, d.num_workers),
                evaluate=evaluate, tokens_per_batch=t.batch_size * d.seq_length,
                flops_per_token=bert_flops_per_token(m, d.seq_length, 0.0), sample=sample,
                initialized_from=t.init_from if init_dir is not None else None)
