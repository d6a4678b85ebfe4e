"""Greedy and beam-search decoding for encoder-decoder models (Transformer, Switch).

The decoder runs on a fixed-length target buffer (static shapes: one compiled graph for every step); position t's
logits give token t+1. Beam search uses the GNMT length penalty lp(Y) = ((5 + |Y|) / 6)^alpha (Wu et al. 2016),
which Vaswani et al. 2017 use with beam 4 and alpha 0.6.
"""
from __future__ import annotations

from typing import List

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn


class _Encode(nn.Cell):
    def __init__(self, model):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, src_ids, src_mask):
        memory, _ = self.model.encode(src_ids, src_mask)
        return memory                                                       # (B, Ss, H)


class _Decode(nn.Cell):
    def __init__(self, model):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, memory, src_mask, tgt_ids, tgt_mask):
        logits, _ = self.model.decode(memory, src_mask, tgt_ids, tgt_mask)
        return ms.ops.log_softmax(ms.ops.cast(logits, ms.float32), -1)   # (B, St, V)


class Seq2SeqDecoder:
    """Drives an encoder-decoder model (in eval mode) step by step with compiled encode / decode graphs."""

    def __init__(self, model, max_len: int, bos: int, eos: int, pad: int):
        self.model, self.max_len, self.bos, self.eos, self.pad = model, max_len, bos, eos, pad
        self.encode = _Encode(model)
        self.decode = _Decode(model)

    def _run(self, src, src_mask):
        self.model.set_train(False)
        return self.encode(Tensor(src, ms.int32), Tensor(src_mask, ms.float32))

    def greedy(self, src: np.ndarray, src_mask: np.ndarray) -> List[List[int]]:
        """Greedy decoding; returns token lists without BOS/EOS."""
        memory = self._run(src, src_mask)
        smask = Tensor(src_mask, ms.float32)
        b = src.shape[0]
        tgt = np.full((b, self.max_len), self.pad, np.int32)
        tgt[:, 0] = self.bos
        tmask = Tensor(np.ones((b, self.max_len), np.float32))
        done = np.zeros(b, bool)
        for t in range(self.max_len - 1):
            logp = self.decode(memory, smask, Tensor(tgt), tmask).asnumpy()[:, t]   # (B, V)
            nxt = np.where(done, self.pad, logp.argmax(-1))
            tgt[:, t + 1] = nxt
            done |= nxt == self.eos
            if done.all():
                break
        return [self._strip(row[1:]) for row in tgt]

    def _strip(self, row) -> List[int]:
        out = []
        for tok in row:
            if tok in (self.eos, self.pad):
                break
            out.append(int(tok))
        return out

    def beam_search(self, src: np.ndarray, src_mask: np.ndarray, beam: int = 4, alpha: float = 0.6) -> List[List[int]]:
        """Beam search with the GNMT length penalty; returns the best hypothesis per source (no BOS/EOS)."""
        b = src.shape[0]
        k = beam
        src_k = np.repeat(src, k, axis=0)                                   # (B*K, Ss)
        mask_k = np.repeat(src_mask, k, axis=0)                             # (B*K, Ss)
        memory = self._run(src_k, mask_k)
        smask = Tensor(mask_k, ms.float32)
        tgt = np.full((b * k, self.max_len), self.pad, np.int32)
        tgt[:, 0] = self.bos
        tmask = Tensor(np.ones((b * k, self.max_len), np.float32))
        scores = np.full((b, k), -np.inf)
        scores[:, 0] = 0.0                                                  # only one live beam at the start
        finished = [[] for _ in range(b)]                                   # (normalised score, tokens)
        for t in range(self.max_len - 1):
            logp = self.decode(memory, smask, Tensor(tgt), tmask).asnumpy()[:, t]   # (B*K, V)
            v = logp.shape[-1]
            cand = scores[:, :, None] + logp.reshape(b, k, v)               # (B, K, V)
            flat = cand.reshape(b, k * v)                                   # (B, K*V)
            top = np.argsort(-flat, axis=1)[:, : 2 * k]                     # (B, 2K)
            new_tgt = np.full_like(tgt, self.pad)
            new_scores = np.full((b, k), -np.inf)
            for i in range(b):
                live = 0
                for idx in top[i]:
                    s = flat[i, idx]
                    if not np.isfinite(s):
                        break
                    src_beam, tok = divmod(int(idx), v)
                    row = tgt[i * k + src_beam].copy()
                    if tok == self.eos or t + 1 == self.max_len - 1:
                        length = t + 1
                        lp = ((5.0 + length) / 6.0) ** alpha
                        toks = self._strip(row[1: t + 1]) if tok == self.eos else self._strip(
                            np.append(row[1: t + 1], tok))
                        finished[i].append((s / lp, toks))
                        continue
                    if live < k:
                        row[t + 1] = tok
                        new_tgt[i * k + live] = row
                        new_scores[i, live] = s
                        live += 1
                    if live == k:
                        break
            tgt, scores = new_tgt, new_scores
            # stop when, for every source, the best finished beats the best live hypothesis's upper bound
            if all(finished[i] and max(f[0] for f in finished[i]) >=
                   scores[i].max() / (((5.0 + self.max_len) / 6.0) ** alpha) for i in range(b)):
                break
        out = []
        for i in range(b):
            if finished[i]:
                out.append(max(finished[i], key=lambda f: f[0])[1])
            else:
                out.append(self._strip(tgt[i * k][1:]))
        return out
