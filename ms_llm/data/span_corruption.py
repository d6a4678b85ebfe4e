"""T5 span-corruption pre-training on the corpus (``data.task: span_corruption``) for encoder-decoder models.

The objective of Raffel et al. 2020 (section 3.1.4; T5's ``random_spans_noise_mask`` / ``span_corruption``), which
Switch Transformer (Fedus et al. 2021) pre-trained with. The corpus is tokenized exactly as the causal-LM task does
(:func:`ms_llm.data.causal_lm.load_tokenizer_and_data`: a byte-level BPE trained on the training documents, ids
0/1/2 = pad/bos/eos as :mod:`ms_llm.data.seq2seq`'s PAD/BOS/EOS, documents joined by eos, the last document held
out), except that the BPE gets ``model.vocab_size - data.num_sentinels`` ids: the top ``data.num_sentinels`` ids are
T5's sentinels, ``<extra_id_0>`` = ``vocab_size - 1`` counting down. The packed stream is cut into windows of
``data.seq_length`` tokens (T5's ``tokens_length``; epoch offsets and order as the causal-LM task's). In each window
``num_noise = round(seq_length * data.noise_density)`` (clipped to [1, seq_length - 1]) tokens are corrupted, in
``num_spans = max(1, round(num_noise / data.mean_noise_span_length))`` spans: the noise and the non-noise tokens are
each split into ``num_spans`` non-empty pieces uniformly at random and interleaved starting with non-noise. The
encoder input is the window with each noise span replaced by one sentinel, plus eos; the target is each sentinel
followed by the span it hides, plus eos (``<X> for inviting <Y> last <Z>``). Since every window has the same length,
the input and target widths are fixed by the algorithm (T5's ``compute_input_and_target_lengths``):
``seq_length - num_noise + num_spans + 1`` and ``num_noise + num_spans + 1``, one compiled shape. The noise mask of
training example ``i`` (global index ``step * batch_size + row``) is drawn from ``(seed, i)``, so batches are a pure
function of ``(seed, step)``; held-out examples are the held-out document's non-overlapping windows with fixed masks.
Evaluation reports the held-out target cross-entropy, its perplexity, the teacher-forced accuracy on the hidden
span tokens (sentinels and eos excluded) and, as the baseline to beat, the cross-entropy of an add-one smoothed
unigram model of the training targets.
"""
from __future__ import annotations

import os
from typing import Iterator, List, NamedTuple, Sequence, Tuple

import numpy as np

from .seq2seq import BOS, EOS, PAD

TRAIN_KEY, EVAL_KEY = 0x5EED, 0xE7A1          # rng stream tags of the training and held-out noise masks


class SpanLengths(NamedTuple):
    num_noise: int          # corrupted tokens per window
    num_spans: int          # noise spans (= sentinels used) per window
    inputs_length: int      # encoder width: non-noise tokens + one sentinel per span + eos
    targets_length: int     # decoder width: one sentinel per span + the span's tokens + eos


def span_corruption_lengths(length: int, noise_density: float, mean_noise_span_length: float) -> SpanLengths:
    """Noise and span counts of a window of ``length`` tokens and the resulting input / target widths.

    T5's arithmetic in float32 with round-half-to-even (``tf.round``), as in ``random_spans_noise_mask``."""
    length = int(length)
    if length < 2:
        raise ValueError(f"data.seq_length={length}: span corruption needs windows of >= 2 tokens")
    num_noise = int(np.round(np.float32(length) * np.float32(noise_density)))
    num_noise = min(max(num_noise, 1), length - 1)
    num_spans = max(1, int(np.round(np.float32(num_noise) / np.float32(mean_noise_span_length))))
    return SpanLengths(num_noise, num_spans, length - num_noise + num_spans + 1, num_noise + num_spans + 1)


def random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths (num_segments,) of a uniformly random split of ``num_items`` items into non-empty consecutive pieces:
    T5's ``_random_segmentation``, a shuffle of the ``num_items - 1`` gaps of which ``num_segments - 1`` start a
    new piece."""
    if not 1 <= num_segments <= num_items:
        raise ValueError(f"cannot split {num_items} tokens into {num_segments} non-empty spans")
    starts = rng.permutation(np.arange(num_items - 1) < num_segments - 1)      # (num_items - 1,) gap starts a piece
    cuts = np.flatnonzero(starts) + 1                                           # (num_segments - 1,)
    return np.diff(np.concatenate([[0], cuts, [num_items]]))                    # (num_segments,)


def random_spans_noise_mask(length: int, noise_density: float, mean_noise_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
    """Boolean noise mask (length,): ``num_spans`` noise runs alternating with as many non-noise runs, starting with
    non-noise (T5's ``random_spans_noise_mask`` without ``random_roll``). The noise lengths are drawn first, then
    the non-noise lengths, from ``rng``."""
    n = span_corruption_lengths(length, noise_density, mean_noise_span_length)
    noise = random_segmentation(n.num_noise, n.num_spans, rng)                  # (K,)
    keep = random_segmentation(length - n.num_noise, n.num_spans, rng)          # (K,)
    runs = np.stack([keep, noise], axis=1).reshape(-1)                          # (2K,) keep, noise, keep, ...
    return np.repeat(np.tile(np.array([False, True]), n.num_spans), runs)       # (length,)


def sentinel_ids(count: int, vocab_size: int) -> np.ndarray:
    """``<extra_id_0>``, ``<extra_id_1>``, ... = vocab_size - 1, vocab_size - 2, ..."""
    return vocab_size - 1 - np.arange(count)


def replace_spans(tokens: np.ndarray, mask: np.ndarray, vocab_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Each run of masked tokens -> one sentinel, the k-th run getting ``vocab_size - 1 - k`` (T5's
    ``noise_span_to_unique_sentinel``). Returns (ids, is_sentinel), both of the shortened length."""
    prev = np.concatenate([[False], mask[:-1]])                                 # (L,) previous token masked
    first = mask & ~prev                                                        # (L,) a run starts here
    out = np.where(first, vocab_size - np.cumsum(first), tokens)               # (L,)
    keep = ~(mask & prev)                                                       # drop the rest of each run
    return out[keep], first[keep]


def corrupt(tokens: np.ndarray, mask: np.ndarray, vocab_size: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs, targets, target_is_span): inputs = non-noise tokens with a sentinel per noise span + eos; targets =
    each sentinel followed by its span + eos; target_is_span flags the targets' hidden span tokens."""
    inputs, _ = replace_spans(tokens, mask, vocab_size)
    targets, is_sentinel = replace_spans(tokens, ~mask, vocab_size)
    eos = np.array([EOS], np.int32)
    return (np.concatenate([inputs, eos]).astype(np.int32), np.concatenate([targets, eos]).astype(np.int32),
            np.concatenate([~is_sentinel, [False]]))


# ------------------------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------------------------
class SpanCorruptionData:
    """Windows of the packed training / held-out streams, corrupted into fixed-width seq2seq batches."""

    def __init__(self, train_stream: np.ndarray, eval_stream: np.ndarray, seq_length: int, noise_density: float,
                 mean_noise_span_length: float, vocab_size: int, num_sentinels: int, seed: int):
        from .causal_lm import PackedLM, windows
        self.lengths = span_corruption_lengths(seq_length, noise_density, mean_noise_span_length)
        if self.lengths.num_spans > num_sentinels:
            raise ValueError(f"data.num_sentinels={num_sentinels}: a window of {seq_length} tokens has "
                             f"{self.lengths.num_spans} noise spans, one sentinel each")
        if len(train_stream) < 2 * seq_length - 1:
            raise ValueError(f"data.seq_length={seq_length}: the training text has only {len(train_stream)} tokens, "
                             f"fewer than {2 * seq_length - 1} (one window at every start offset)")
        if len(eval_stream) < seq_length:
            raise ValueError(f"data.seq_length={seq_length}: the held-out document has only {len(eval_stream)} "
                             f"tokens, fewer than one window")
        self.seq_length, self.density, self.mean_span = seq_length, noise_density, mean_noise_span_length
        self.vocab_size, self.num_sentinels, self.seed = vocab_size, num_sentinels, seed
        # PackedLM's windows are seq_length + 1 wide (input + shifted label): ask for seq_length - 1
        self.packed = PackedLM(train_stream, eval_stream, seq_length - 1, seed)
        self.per_epoch = self.packed.per_epoch
        self.eval_windows = windows(eval_stream, seq_length)                    # (N, seq_length)

    # ---------------------------------------------------------------- examples
    def mask(self, key: Sequence[int]) -> np.ndarray:
        return random_spans_noise_mask(self.seq_length, self.density, self.mean_span, np.random.default_rng(key))

    def train_example(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        """(window, noise mask) of global training example ``i``."""
        window = self.packed.epoch_windows(i // self.per_epoch)[i % self.per_epoch]
        return window, self.mask([self.seed, TRAIN_KEY, i])

    def eval_example(self, j: int) -> Tuple[np.ndarray, np.ndarray]:
        return self.eval_windows[j], self.mask([self.seed, EVAL_KEY, j])

    def encode(self, examples: Sequence[Tuple[np.ndarray, np.ndarray]], valid: Sequence[bool] = ()):
        """(src, src_mask, tgt_in, tgt_mask, labels, label_mask, span_mask) of (window, mask) pairs; rows with
        ``valid`` False (batch filling) get zero label and span masks. span_mask flags the hidden span tokens."""
        b, ls, lt = len(examples), self.lengths.inputs_length, self.lengths.targets_length
        src = np.full((b, ls), PAD, np.int32)
        labels = np.full((b, lt), PAD, np.int32)
        span = np.zeros((b, lt), bool)
        src_mask = np.zeros((b, ls), np.float32)
        tgt_mask = np.zeros((b, lt), np.float32)
        for r, (window, mask) in enumerate(examples):
            inputs, targets, is_span = corrupt(window, mask, self.vocab_size)
            src[r, : len(inputs)], src_mask[r, : len(inputs)] = inputs, 1.0
            labels[r, : len(targets)], tgt_mask[r, : len(targets)] = targets, 1.0
            span[r, : len(targets)] = is_span
        tgt_in = np.concatenate([np.full((b, 1), BOS, np.int32), labels[:, :-1]], axis=1)   # (B, Lt) BOS + shifted
        tgt_in = np.where(tgt_mask > 0, tgt_in, PAD).astype(np.int32)
        label_mask = tgt_mask.copy()
        if len(valid):
            ok = np.asarray(valid, bool)[:, None]                              # (B, 1)
            label_mask *= ok
            span &= ok
        return src, src_mask, tgt_in, tgt_mask, labels, label_mask, span

    def batch(self, step: int, batch_size: int) -> Tuple[np.ndarray, ...]:
        """The six Seq2SeqLoss inputs of global step ``step``."""
        rows = [self.train_example(i) for i in range(step * batch_size, (step + 1) * batch_size)]
        return self.encode(rows)[:6]

    def batches(self, start_step: int, batch_size: int) -> Iterator[Tuple[np.ndarray, ...]]:
        step = start_step
        while True:
            yield self.batch(step, batch_size)
            step += 1

    def eval_batches(self, batch_size: int) -> List[Tuple[np.ndarray, ...]]:
        """Every held-out window once, in batches of exactly ``batch_size`` rows (7-tuples of :meth:`encode`; the
        last batch is filled with repeats whose masks are zero)."""
        n = len(self.eval_windows)
        out = []
        for s in range(0, n, batch_size):
            idx = [min(j, n - 1) for j in range(s, s + batch_size)]
            out.append(self.encode([self.eval_example(j) for j in idx], [j < n for j in range(s, s + batch_size)]))
        return out

    def unigram_loss(self) -> float:
        """Held-out target cross-entropy (nats/token) of the add-one smoothed unigram distribution of the targets of
        one epoch of training examples (sentinels and eos included)."""
        counts = np.ones(self.vocab_size, np.float64)
        for i in range(self.per_epoch):
            counts += np.bincount(corrupt(*self.train_example(i), self.vocab_size)[1], minlength=self.vocab_size)
        logp = np.log(counts / counts.sum())
        held = np.concatenate([corrupt(*self.eval_example(j), self.vocab_size)[1]
                               for j in range(len(self.eval_windows))])
        return float(-logp[held].mean())


def render(ids: Sequence[int], tok, vocab_size: int, num_sentinels: int) -> str:
    """Text of ids with sentinels shown as ``<extra_id_k>`` (eos / pad dropped)."""
    parts, run = [], []
    for i in map(int, ids):
        if i >= vocab_size - num_sentinels:
            parts.append(tok.decode(run))
            parts.append(f"<extra_id_{vocab_size - 1 - i}>")
            run = []
        else:
            run.append(i)
    parts.append(tok.decode(run))
    return "".join(parts)


# ------------------------------------------------------------------------------------------------------------------
# the task
# ------------------------------------------------------------------------------------------------------------------
def build_span_corruption_task(cfg):
    """``data.task: span_corruption`` — T5 span-corruption pre-training of an encoder-decoder model (transformer or
    switch) on the corpus; evaluate reports held-out target loss, perplexity and span-token accuracy, sample shows a
    held-out corrupted input with its gold and greedy-decoded spans."""
    from types import SimpleNamespace

    from mindspore import Tensor

    from ..models import build_model
    from ..models.seq2seq_decode import Seq2SeqDecoder
    from ..moe.layer import moe_log_metrics
    from ..training.seq2seq_task import Seq2SeqLoss, seq2seq_flops_per_token
    from ..training.task import Task
    from .causal_lm import load_tokenizer_and_data

    m, d, t = cfg.model, cfg.data, cfg.train
    if (m.pad_token_id, m.bos_token_id, m.eos_token_id) != (PAD, BOS, EOS):
        raise ValueError(f"model.pad_token_id/bos_token_id/eos_token_id: span corruption uses {PAD}/{BOS}/{EOS} "
                         f"(the trained BPE's <|pad|>/<|bos|>/<|endoftext|>), got "
                         f"{m.pad_token_id}/{m.bos_token_id}/{m.eos_token_id}")
    text_vocab = m.vocab_size - d.num_sentinels
    # the causal-LM tokenization with the sentinel ids kept out of the BPE; windows are cut below
    view = SimpleNamespace(model=SimpleNamespace(vocab_size=text_vocab, eos_token_id=m.eos_token_id),
                           data=SimpleNamespace(corpus=d.corpus, tokenizer=d.tokenizer, seq_length=1),
                           train=SimpleNamespace(seed=t.seed))
    try:
        tok, streams = load_tokenizer_and_data(view)
    except ValueError as e:
        if "model.vocab_size" not in str(e):
            raise
        raise ValueError(f"{e} (span corruption leaves the tokenizer model.vocab_size - data.num_sentinels = "
                         f"{m.vocab_size} - {d.num_sentinels} = {text_vocab} ids)") from e
    if (tok.pad_id, tok.bos_id) != (PAD, BOS):
        raise ValueError(f"data.tokenizer: span corruption needs <|pad|>/<|bos|> at ids {PAD}/{BOS}, the tokenizer "
                         f"has {tok.pad_id}/{tok.bos_id}")
    tok.save(os.path.join(t.output_dir, "tokenizer"))
    data = SpanCorruptionData(streams.train, streams.eval, d.seq_length, d.noise_density, d.mean_noise_span_length,
                              m.vocab_size, d.num_sentinels, t.seed)
    ls, lt = data.lengths.inputs_length, data.lengths.targets_length
    model = build_model(m)
    loss_net = Seq2SeqLoss(model, t.label_smoothing)
    decoder = Seq2SeqDecoder(model, lt, BOS, EOS, PAD)
    eval_batches = data.eval_batches(t.micro_batch_size)
    unigram = data.unigram_loss()

    def evaluate(net):
        net.set_train(False)
        nll, count, hits, spans = 0.0, 0.0, 0, 0
        for src, src_mask, tgt_in, tgt_mask, labels, label_mask, span in eval_batches:
            logits = net(Tensor(src), Tensor(src_mask), Tensor(tgt_in), Tensor(tgt_mask))[0]
            logits = logits.asnumpy().astype(np.float64)                        # (B, Lt, V)
            top = logits.max(-1, keepdims=True)                                 # (B, Lt, 1)
            logz = top[..., 0] + np.log(np.exp(logits - top).sum(-1))           # (B, Lt)
            picked = np.take_along_axis(logits, labels[..., None], -1)[..., 0]  # (B, Lt)
            nll += float(((logz - picked) * label_mask).sum())
            count += float(label_mask.sum())
            hits += int(((logits.argmax(-1) == labels) & span).sum())
            spans += int(span.sum())
        loss = nll / count
        return {"loss": loss, "perplexity": float(np.exp(loss)), "span_accuracy": hits / max(spans, 1),
                "unigram_loss": unigram}

    def sample(net):
        src, src_mask, _, _, labels, label_mask, _ = data.encode([data.eval_example(0)])
        pred = decoder.greedy(src, src_mask)[0]
        gold = labels[0][: int(label_mask[0].sum()) - 1]                       # without the final eos
        show = lambda ids: render(ids, tok, m.vocab_size, d.num_sentinels)     # noqa: E731
        return ("span corruption sample (held-out window; greedy decoding):\n"
                f"input:  {show(src[0][: int(src_mask[0].sum()) - 1])}\n"
                f"gold:   {show(gold)}\n"
                f"greedy: {show(pred)}")

    # seq2seq_flops_per_token counts per target token; tokens_per_batch counts corpus tokens (windows)
    fpt = seq2seq_flops_per_token(m, ls, lt) * lt / d.seq_length
    return Task(model=model, loss_net=loss_net, batches=lambda s: data.batches(s, t.batch_size), evaluate=evaluate,
                tokens_per_batch=t.batch_size * d.seq_length, flops_per_token=fpt, sample=sample,
                log_metrics=moe_log_metrics if m.moe.num_experts > 0 else None)
