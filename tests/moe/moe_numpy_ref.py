"""Independent numpy (float64) transcriptions of the MoE papers' formulas, used by the tests in this folder.

Written from the papers, loop by loop, sharing no code with ms_llm.moe.
"""
from __future__ import annotations

import math

import numpy as np


def softmax(x, axis=-1):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def softplus(x):
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0)


def normal_cdf(x):
    return 0.5 * (1.0 + np.vectorize(math.erf)(np.asarray(x) / math.sqrt(2.0)))


def cv_squared(v, eps=1e-10):
    v = np.asarray(v, np.float64)
    return v.var() / (v.mean() ** 2 + eps)


def topk_desc(row, k):
    """Indices of the k largest entries, largest first (inputs in the tests have no ties)."""
    return list(np.argsort(-np.asarray(row), kind="stable")[:k])


def route_topk(probs, k, capacity):
    """GShard token-choice routing for one group: first choices of all tokens in token order, then second
    choices; a choice is kept while its expert has fewer than ``capacity`` earlier choices."""
    t_count, e_count = probs.shape
    index = np.array([topk_desc(probs[t], k) for t in range(t_count)], np.int64).reshape(t_count, k)
    gates = np.take_along_axis(probs, index, 1)
    position = np.zeros((t_count, k), np.int64)
    filled = np.zeros(e_count, np.int64)
    for j in range(k):
        for t in range(t_count):
            e = index[t, j]
            position[t, j] = filled[e]
            filled[e] += 1
    kept = (position < capacity).astype(np.float64)
    return index, gates * kept, position, kept


def ffn(x, w_in, w_out, activation, w_gate=None, b_in=None, b_out=None):
    """One expert: x (N, H), w_in (H, F), w_out (F, H)."""
    h = x @ w_in + (0 if b_in is None else b_in)
    acts = {"relu": lambda z: np.maximum(z, 0),
            "gelu": lambda z: 0.5 * z * (1 + np.vectorize(math.erf)(z / math.sqrt(2))),
            "silu": lambda z: z / (1 + np.exp(-z))}
    if w_gate is not None:
        h = acts[activation](x @ w_gate) * h
    else:
        h = acts[activation](h)
    return h @ w_out + (0 if b_out is None else b_out)


def switch_load_balance(probs, top1):
    """Fedus et al. 2021 eq. (4)-(6) per group, averaged over groups: N * sum_i f_i P_i."""
    g_count, t_count, e_count = probs.shape
    out = []
    for g in range(g_count):
        f = np.array([np.sum(top1[g] == i) / t_count for i in range(e_count)])
        p = probs[g].mean(0)
        out.append(e_count * np.sum(f * p))
    return float(np.mean(out))


def z_loss(logits):
    """Zoph et al. 2022 eq. (5): mean over tokens of log(sum_j exp(x_j))^2."""
    flat = np.asarray(logits, np.float64).reshape(-1, logits.shape[-1])
    return float(np.mean([math.log(np.sum(np.exp(row))) ** 2 for row in flat]))


def kth_excluding(v, k, i):
    """The k-th highest component of v, excluding component i (Shazeer et al. 2017, after eq. (9))."""
    others = np.delete(np.asarray(v), i)
    return np.sort(others)[::-1][k - 1]


def noisy_topk(x, w_g, w_noise, k, noise, training=True, noise_epsilon=0.0):
    """Shazeer et al. 2017 eq. (3)-(5), (6)-(11) for tokens x (N, H) with fixed N(0,1) draws ``noise`` (N, E).

    Returns gates G (N, E), the importance loss CV(sum_x G(x))^2 and the load loss CV(sum_x P(x, i))^2 (smooth
    estimator with noise, counts without).
    """
    clean = x @ w_g
    std = softplus(x @ w_noise) + noise_epsilon
    h = clean + noise * std if training else clean
    n_tok, n_exp = h.shape
    gates = np.zeros_like(h)
    for t in range(n_tok):
        keep = topk_desc(h[t], k)
        masked = np.full(n_exp, -np.inf)
        masked[keep] = h[t, keep]
        gates[t] = softmax(masked)
    importance = cv_squared(gates.sum(0))
    if training and k < n_exp:
        p = np.zeros_like(h)
        for t in range(n_tok):
            for i in range(n_exp):
                p[t, i] = normal_cdf((clean[t, i] - kth_excluding(h[t], k, i)) / std[t, i])
        load = cv_squared(p.sum(0))
    else:
        load = cv_squared((gates > 0).sum(0))
    return gates, importance, load
