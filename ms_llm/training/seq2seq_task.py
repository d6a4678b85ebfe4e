"""The generated seq2seq task (reverse / sort / copy) for encoder-decoder models."""
from __future__ import annotations

import numpy as np
from mindspore import nn, ops

from ..data.seq2seq import BOS, EOS, PAD, Seq2SeqData
from ..models.seq2seq_decode import Seq2SeqDecoder
from .losses import cross_entropy
from ..moe.layer import moe_log_metrics
from .task import Task


class Seq2SeqLoss(nn.Cell):
    """Label-smoothed token cross entropy of an encoder-decoder model, plus its auxiliary (MoE) loss."""

    def __init__(self, model, smoothing: float):
        super().__init__(auto_prefix=False)
        self.model = model
        self.smoothing = smoothing

    def construct(self, src, src_mask, tgt_in, tgt_mask, labels, label_mask):
        logits, aux = self.model(src, src_mask, tgt_in, tgt_mask)          # (B, St, V)
        v = logits.shape[-1]
        loss = cross_entropy(ops.reshape(logits, (-1, v)), ops.reshape(labels, (-1,)),
                             ops.reshape(label_mask, (-1,)), self.smoothing)
        return loss + aux


def seq2seq_flops_per_token(cfg, src_len: int, tgt_len: int) -> float:
    """Training FLOPs per target token: 6 x (matmul parameters touched per token) + attention score/value matmuls."""
    h, f, L, Ld = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_layers, cfg.decoder_layers
    ffn = (3 if cfg.is_gated else 2) * h * f
    enc = L * (4 * h * h + ffn) * src_len / tgt_len
    dec = Ld * (8 * h * h + ffn)
    attn = 2 * h * (L * src_len * src_len + Ld * (tgt_len * tgt_len + tgt_len * src_len)) / tgt_len
    return 6.0 * (enc + dec + h * cfg.vocab_size) + 3.0 * 2.0 * attn


def build_seq2seq_task(cfg) -> Task:
    from ..models import build_model
    m, d, t = cfg.model, cfg.data, cfg.train
    if (m.pad_token_id, m.bos_token_id, m.eos_token_id) != (PAD, BOS, EOS):
        raise ValueError(f"seq2seq tasks use pad/bos/eos ids {PAD}/{BOS}/{EOS}; set model.pad_token_id etc. to them")
    if d.src_length + 1 > m.max_position_embeddings:
        raise ValueError(f"data.src_length+1={d.src_length + 1} exceeds model.max_position_embeddings="
                         f"{m.max_position_embeddings}")
    data = Seq2SeqData(d.task, m.vocab_size, d.src_length, d.min_length, d.num_train, d.num_eval, t.seed)
    model = build_model(m)
    loss_net = Seq2SeqLoss(model, t.label_smoothing)
    decoder = Seq2SeqDecoder(model, data.width, BOS, EOS, PAD)

    def evaluate(net):
        src, src_mask = data.encode(data.eval_seqs)[:2]
        pred = []
        for i in range(0, len(src), 100):
            pred += decoder.greedy(src[i:i + 100], src_mask[i:i + 100])
        gold = data.expected(data.eval_seqs)
        exact = float(np.mean([p == g for p, g in zip(pred, gold)]))
        return {"exact_match": exact}

    def sample(net):
        seqs = data.eval_seqs[:3]
        src, src_mask = data.encode(seqs)[:2]
        beams = decoder.beam_search(src, src_mask, beam=4, alpha=0.6)
        lines = [f"{list(map(int, s))} -> {b} (expected {g})" for s, b, g in zip(seqs, beams, data.expected(seqs))]
        return "beam search (k=4, alpha=0.6):\n" + "\n".join(lines)

    tokens = t.batch_size * data.width
    return Task(model=model, loss_net=loss_net, batches=lambda s: data.batches(s, t.batch_size), evaluate=evaluate,
                tokens_per_batch=tokens, flops_per_token=seq2seq_flops_per_token(m, data.width, data.width),
                sample=sample, log_metrics=moe_log_metrics if m.moe.num_experts > 0 else None)
