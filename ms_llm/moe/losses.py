"""Auxiliary losses of MoE routers, as pure functions of MindSpore tensors (usable in GRAPH_MODE and PyNative).

Every function takes float32 router tensors and returns a float32 scalar (or per-expert vector); the weights
(``moe.load_balance_coef`` etc.) are applied by the router, not here. Each one is tested against a numpy
transcription of its paper's formula in ``tests/moe/test_losses.py``.
"""
from __future__ import annotations

import math

import mindspore as ms
from mindspore import ops

CV_EPS = 1e-10  # tensor2tensor's cv_squared epsilon: keeps CV^2 finite when every value is 0


def switch_load_balance(probs, top1_index):
    """Switch Transformer (Fedus et al. 2021, eq. 4-6) loss ``N * sum_i f_i * P_i`` per routing group, averaged.

    probs (G, T, E) float32 router softmax; top1_index (G, T) int32 each token's first-choice expert (before any
    capacity drop). f_i = fraction of the group's tokens whose first choice is i, P_i = mean router probability of
    i. Equals 1 for perfectly uniform routing. (The coefficient alpha is applied by the caller.)
    """
    num_experts = probs.shape[-1]
    mask = ops.one_hot(top1_index, num_experts, 1.0, 0.0)                 # (G, T, E)
    f = ops.mean(mask, 1)                                                  # (G, E)
    p = ops.mean(probs, 1)                                                 # (G, E)
    return ops.mean(ops.sum(f * p, -1)) * num_experts


def router_z_loss(logits):
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits)^2. logits (..., E)."""
    return ops.mean(ops.square(ops.logsumexp(logits, -1)))


def cv_squared(x):
    """Squared coefficient of variation of a vector: population variance / (mean^2 + eps). x (E,)."""
    mean = ops.mean(x)
    var = ops.mean(ops.square(x - mean))
    return var / (mean * mean + CV_EPS)


def importance_loss(gates):
    """Shazeer et al. 2017 eq. (6)-(7) without w_importance: CV(Importance(X))^2, Importance(X) = sum_x G(x).

    gates (..., E): the gate values G(x) of every token (0 for experts outside its top k).
    """
    importance = ops.reshape(gates, (-1, gates.shape[-1])).sum(0)         # (E,)
    return cv_squared(importance)


def normal_cdf(x):
    """Phi(x), the standard normal cumulative distribution function."""
    return 0.5 * (1.0 + ops.erf(x / math.sqrt(2.0)))


def smooth_load(clean_logits, noisy_logits, noise_std, k: int):
    """Shazeer et al. 2017 eq. (8)-(9): P(x, i), the probability that expert i stays in the top k under new noise.

    P(x, i) = Phi(((x W_g)_i - kth_excluding(H(x), k, i)) / Softplus((x W_noise)_i)). kth_excluding(H, k, i), the
    k-th largest of H without component i, is the (k+1)-th largest of H if i is in the top k and the k-th largest
    otherwise. clean_logits, noisy_logits, noise_std: (..., E) float32; needs k < E. Returns (..., E).
    """
    num_experts = clean_logits.shape[-1]
    if not 1 <= k < num_experts:
        raise ValueError(f"smooth_load needs 1 <= k < num_experts, got k={k}, num_experts={num_experts}")
    top, _ = ops.topk(noisy_logits, k + 1)                                 # (..., k+1)
    threshold_if_in = top[..., k:k + 1]                                    # (..., 1) (k+1)-th largest
    threshold_if_out = top[..., k - 1:k]                                   # (..., 1) k-th largest
    is_in = noisy_logits > threshold_if_in                                 # (..., E)
    prob_if_in = normal_cdf((clean_logits - threshold_if_in) / noise_std)
    prob_if_out = normal_cdf((clean_logits - threshold_if_out) / noise_std)
    return ops.select(is_in, prob_if_in, prob_if_out)


def load_loss(load):
    """Shazeer et al. 2017 eq. (10)-(11) without w_load: CV(Load(X))^2, Load(X)_i = sum_x P(x, i).

    load (..., E): per-token load estimates P(x, i) (smooth, from :func:`smooth_load`) or 0/1 dispatch counts.
    """
    per_expert = ops.reshape(load, (-1, load.shape[-1])).sum(0)           # (E,)
    return cv_squared(ops.cast(per_expert, ms.float32))
