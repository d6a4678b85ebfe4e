"""Losses as pure functions of MindSpore tensors (float32)."""
from __future__ import annotations

import mindspore as ms
from mindspore import ops


def cross_entropy(logits, labels, mask, smoothing: float = 0.0):
    """Mean token cross entropy over positions where ``mask`` is 1, with label smoothing.

    logits (N, V), labels (N,) int32, mask (N,) float32. With smoothing eps the target distribution is
    (1 - eps) * one_hot + eps / V (Szegedy et al. 2016, as used by Vaswani et al. 2017 with eps = 0.1), so
    loss = (1 - eps) * nll + eps * mean_v(-log p_v).
    """
    logp = ops.log_softmax(ops.cast(logits, ms.float32), -1)              # (N, V)
    nll = -ops.gather_elements(logp, 1, ops.expand_dims(labels, -1))[:, 0]   # (N,)
    if smoothing > 0:
        smooth = -ops.mean(logp, -1)                                      # (N,)
        nll = (1.0 - smoothing) * nll + smoothing * smooth
    mask = ops.cast(mask, ms.float32)
    return ops.sum(nll * mask) / ops.maximum(ops.sum(mask), 1.0)
