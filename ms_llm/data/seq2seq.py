"""Generated sequence-to-sequence tasks (reverse, sort, copy) with a fixed held-out set.

Vocabulary: 0 = pad, 1 = BOS, 2 = EOS, 3.. = content tokens. Source = content + EOS; decoder input = BOS + target;
labels = target + EOS; everything padded to ``src_length + 1``.
"""
from __future__ import annotations

from typing import Iterator, Tuple

import numpy as np

PAD, BOS, EOS, FIRST = 0, 1, 2, 3


def transform(task: str, seq: np.ndarray) -> np.ndarray:
    if task == "reverse":
        return seq[::-1]
    if task == "sort":
        return np.sort(seq)
    if task == "copy":
        return seq.copy()
    raise ValueError(f"unknown seq2seq task '{task}'; valid: reverse, sort, copy")


class Seq2SeqData:
    """Deterministic examples: a training pool and a disjoint held-out set, batches by (seed, step)."""

    def __init__(self, task: str, vocab_size: int, src_length: int, min_length: int, num_train: int, num_eval: int,
                 seed: int):
        if vocab_size <= FIRST + 1:
            raise ValueError(f"model.vocab_size={vocab_size} leaves no content tokens (need > {FIRST + 1})")
        self.task, self.vocab, self.max_len, self.min_len, self.seed = task, vocab_size, src_length, min_length, seed
        self.width = src_length + 1
        rng = np.random.default_rng(seed)
        seen = set()
        self.eval_seqs = self._draw(rng, num_eval, seen)
        self.train_seqs = self._draw(rng, num_train, seen)

    def _draw(self, rng, n, seen):
        out = []
        tries = 0
        while len(out) < n:
            tries += 1
            if tries > 50 * n + 1000:
                raise ValueError(f"cannot draw {n} distinct sequences from vocab {self.vocab} and length "
                                 f"{self.min_len}..{self.max_len}")
            length = int(rng.integers(self.min_len, self.max_len + 1))
            seq = rng.integers(FIRST, self.vocab, size=length)
            key = seq.tobytes()
            if key in seen:
                continue
            seen.add(key)
            out.append(seq)
        return out

    def encode(self, seqs) -> Tuple[np.ndarray, ...]:
        """(src, src_mask, tgt_in, tgt_mask, labels, label_mask) arrays for a list of content sequences."""
        n, w = len(seqs), self.width
        src = np.full((n, w), PAD, np.int32)
        tgt_in = np.full((n, w), PAD, np.int32)
        labels = np.full((n, w), PAD, np.int32)
        for i, s in enumerate(seqs):
            t = transform(self.task, s)
            src[i, : len(s)] = s
            src[i, len(s)] = EOS
            tgt_in[i, 0] = BOS
            tgt_in[i, 1: len(t) + 1] = t
            labels[i, : len(t)] = t
            labels[i, len(t)] = EOS
        src_mask = (src != PAD).astype(np.float32)
        tgt_mask = np.zeros_like(src_mask)
        for i, s in enumerate(seqs):
            tgt_mask[i, : len(s) + 1] = 1.0
        return src, src_mask, tgt_in, tgt_mask, labels, tgt_mask.copy()

    def batch(self, step: int, batch_size: int) -> Tuple[np.ndarray, ...]:
        rng = np.random.default_rng([self.seed, 7919, step])
        idx = rng.integers(0, len(self.train_seqs), size=batch_size)
        return self.encode([self.train_seqs[i] for i in idx])

    def batches(self, start_step: int, batch_size: int) -> Iterator[Tuple[np.ndarray, ...]]:
        step = start_step
        while True:
            yield self.batch(step, batch_size)
            step += 1

    def expected(self, seqs):
        return [list(transform(self.task, s)) for s in seqs]
