"""Routers against numpy transcriptions: GShard capacity order, Switch top-1, top-2 normalisation, Shazeer noisy
top-k (equations 3-11, gradients through the load loss), expert choice; capacity edge cases.

Tolerances: float32 against float64 references, rtol 1e-5 / atol 1e-6 on probabilities and losses; routing
decisions (indices, positions, kept) exact.
"""
import math

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn

from ms_llm.config import ConfigError, ModelConfig, MoEConfig
from ms_llm.moe.router import (ROUTER_FIELDS, ExpertChoiceRouter, NoisyTopKRouter, TopKRouter, expert_capacity,
                               route_topk)
import moe_numpy_ref as ref

H = 8


def make_cfg(**moe):
    moe.setdefault("num_experts", 4)
    return ModelConfig(arch="glam", hidden_size=H, num_heads=2, ffn_hidden_size=16, dropout=0.0,
                       moe=MoEConfig(**moe))


class RouteTopK(nn.Cell):
    def __init__(self, k, capacity):
        super().__init__()
        self.k = k
        self.capacity = capacity

    def construct(self, probs):
        return route_topk(probs, self.k, self.capacity)


class FixedNoise(nn.Cell):
    def __init__(self, noise):
        super().__init__()
        self.noise = Tensor(noise.astype(np.float32))

    def construct(self, shape):
        return self.noise


def set_weight(param, value):
    param.set_data(Tensor(np.asarray(value, np.float32)))


def expected_slots(index, combine, position, kept, num_experts, capacity):
    """(E, C) token ids and weights of one group from token-side routing."""
    tok = np.zeros((num_experts, capacity), np.int64)
    wt = np.zeros((num_experts, capacity))
    for t in range(index.shape[0]):
        for j in range(index.shape[1]):
            if kept[t, j]:
                tok[index[t, j], position[t, j]] = t
                wt[index[t, j], position[t, j]] = combine[t, j]
    return tok, wt


@pytest.mark.parametrize("k,capacity", [(1, 2), (2, 3), (3, 4), (2, 1)])
def test_route_topk_matches_gshard_order(rng, k, capacity):
    probs = ref.softmax(rng.normal(size=(12, 5)) * 2)
    got = [o.asnumpy() for o in RouteTopK(k, capacity)(Tensor(probs.astype(np.float32)))]
    index, combine, position, kept = ref.route_topk(probs, k, capacity)
    np.testing.assert_array_equal(got[0], index)
    np.testing.assert_allclose(got[1], combine, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got[2], position)
    np.testing.assert_array_equal(got[3], kept)
    assert got[0].dtype == np.int32 and got[2].dtype == np.int32
    assert got[1].dtype == np.float32 and got[3].dtype == np.float32


def test_route_topk_edge_cases():
    t_count, e_count = 6, 3
    # every token routed to expert 1: the first `capacity` tokens (token order) are kept, the rest dropped
    probs = np.tile(np.array([[0.1, 0.8, 0.1]], np.float32), (t_count, 1))
    probs[:, 0] += np.linspace(0, 0.01, t_count, dtype=np.float32)   # no ties between experts 0 and 2
    idx, comb, pos, kept = (o.asnumpy() for o in RouteTopK(1, 4)(Tensor(probs)))
    assert (idx[:, 0] == 1).all()
    np.testing.assert_array_equal(pos[:, 0], np.arange(t_count))
    np.testing.assert_array_equal(kept[:, 0], [1, 1, 1, 1, 0, 0])
    np.testing.assert_allclose(comb[:, 0], probs[:, 1] * kept[:, 0])
    # capacity >= tokens: nothing is dropped, and expert 2 (nobody's first choice) simply receives no token
    idx, comb, pos, kept = (o.asnumpy() for o in RouteTopK(1, t_count)(Tensor(probs)))
    assert kept.all() and not (idx == 2).any()
    # k greater than the number of experts is a clear error (also in the config)
    with pytest.raises(ValueError, match="greater than the number of experts"):
        route_topk(Tensor(probs), 4, 2)
    with pytest.raises(ConfigError, match="top_k"):
        MoEConfig(num_experts=3, top_k=4)
    with pytest.raises(ValueError, match=r"\(T, E\)"):
        route_topk(Tensor(probs[None]), 1, 2)


def test_expert_capacity_formula():
    assert expert_capacity(16, 1, 1.25, 4) == 5                  # ceil(16 * 1.25 / 4) = 5, not 6 from rounding
    assert expert_capacity(10, 2, 1.0, 4) == 5
    assert expert_capacity(7, 1, 1.0, 4) == 2
    assert expert_capacity(4, 1, 0.1, 8, min_capacity=3) == 3
    assert expert_capacity(8, 2, 4.0, 2) == 8                    # capped at the number of tokens
    assert expert_capacity(100, 1, 1.0, 4, fixed=64) == 64       # Hugging Face's fixed expert_capacity
    assert expert_capacity(11, 1, 1.0, 4, fixed=64) == 11
    with pytest.raises(ValueError, match="greater than the number of experts"):
        expert_capacity(8, 3, 1.0, 2)


def switch_reference(x, w, k, capacity, normalize, coefs):
    """Numpy Switch / GShard router over groups: returns probs, slots and (aux, losses, load, dropped)."""
    logits = x @ w.T
    probs = ref.softmax(logits)
    g_count, t_count, e_count = probs.shape
    toks, wts, gates_all, kept_all, top1, requests = [], [], [], [], [], np.zeros(e_count)
    for g in range(g_count):
        index, combine, position, kept = ref.route_topk(probs[g], k, capacity)
        chosen = np.take_along_axis(probs[g], index, 1)
        if normalize:
            combine = combine / chosen.sum(1, keepdims=True)
            chosen = chosen / chosen.sum(1, keepdims=True)
        tok, wt = expected_slots(index, combine, position, kept, e_count, capacity)
        toks.append(tok)
        wts.append(wt)
        dense = np.zeros((t_count, e_count))
        np.put_along_axis(dense, index, chosen, 1)
        gates_all.append(dense)
        kept_all.append(kept)
        top1.append(index[:, 0])
        for e in index.reshape(-1):
            requests[e] += 1
    losses = np.array([ref.switch_load_balance(probs, np.stack(top1)), ref.z_loss(logits),
                       ref.cv_squared(np.concatenate(gates_all).sum(0)), ref.cv_squared(requests)])
    dropped = 1 - np.sum(kept_all) / requests.sum()
    return probs, np.stack(toks), np.stack(wts), float(np.dot(coefs, losses)), losses, requests / requests.sum(), \
        dropped


@pytest.mark.parametrize("k,normalize", [(1, True), (2, True)])   # k=2 unnormalised = route_topk's gates
def test_topk_router_matches_numpy(rng, k, normalize):
    coefs = [0.01, 0.001, 0.1, 0.2]
    cfg = make_cfg(top_k=k, normalize_top_k=normalize, capacity_factor_eval=1.0, load_balance_coef=coefs[0],
                   z_loss_coef=coefs[1], importance_coef=coefs[2], load_coef=coefs[3])
    router = TopKRouter(cfg)
    w = rng.normal(size=(4, H))
    set_weight(router.gate.weight, w)
    router.set_train(False)
    x = rng.normal(size=(2, 10, H))
    out = router(Tensor(x.astype(np.float32)))
    assert tuple(out.keys()) == ROUTER_FIELDS
    capacity = math.ceil(10 * k * 1.0 / 4)
    probs, tok, wt, aux, losses, load, dropped = switch_reference(x, w, k, capacity, normalize and k > 1,
                                                                  np.array(coefs))
    np.testing.assert_allclose(out.probs.asnumpy(), probs, rtol=1e-5, atol=1e-6)
    assert out.slot_token.shape == (2, 4, capacity)
    mask = wt > 0
    np.testing.assert_array_equal(out.slot_token.asnumpy()[mask], tok[mask])
    np.testing.assert_allclose(out.slot_weight.asnumpy(), wt, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.losses.asnumpy(), losses, rtol=1e-5, atol=1e-6)
    assert float(out.aux_loss.asnumpy()) == pytest.approx(aux, rel=1e-5)
    np.testing.assert_allclose(out.load.asnumpy(), load, rtol=1e-6)
    assert float(out.dropped.asnumpy()) == pytest.approx(dropped, abs=1e-6)
    assert dropped > 0, "the test should exercise dropping"


def test_capacity_and_jitter_follow_set_train(rng):
    """Training: capacity factor 1.0 and multiplicative jitter; evaluation: factor 2.0 and exact logits."""
    router = TopKRouter(make_cfg(capacity_factor_train=1.0, capacity_factor_eval=2.0, jitter_eps=0.5))
    w = rng.normal(size=(4, H))
    set_weight(router.gate.weight, w)
    x = rng.normal(size=(1, 8, H))
    router.set_train(True)
    out = router(Tensor(x.astype(np.float32)))
    assert out.slot_token.shape == (1, 4, 2)
    assert np.abs(out.logits.asnumpy() - x @ w.T).max() > 1e-3
    router.set_train(False)
    out = router(Tensor(x.astype(np.float32)))
    assert out.slot_token.shape == (1, 4, 4)
    np.testing.assert_allclose(out.logits.asnumpy(), x @ w.T, rtol=1e-5, atol=1e-5)


def test_second_expert_sampling():
    """GShard: the second expert is kept with probability min(1, 2 * g2) (g2 the normalised gate) while training.

    Tokens 0-3: g2 ~ e^-30 (never kept); tokens 4-7: a tie, g2 = 0.5 exactly (always kept); tokens 8-: g1 = 0.75,
    g2 = 0.25 (kept with probability 0.5; the fraction must lie within 6 binomial standard deviations).
    """
    n = 2048
    cfg = make_cfg(num_experts=3, top_k=2, second_expert_policy="sampling", capacity_factor_train=3.0)
    router = TopKRouter(cfg)
    set_weight(router.gate.weight, np.eye(3, H) * 30)
    x = np.zeros((1, n, H), np.float32)
    x[0, :4, 0] = 1.0
    x[0, 4:, 1] = 1.0
    x[0, 4:8, 2] = 1.0
    x[0, 8:, 2] = 1.0 - math.log(3.0) / 30                  # logits 30 and 30 - ln 3: gates 0.75 / 0.25
    router.set_train(True)
    out = router(Tensor(x))
    slot_w = out.slot_weight.asnumpy()[0]                    # (E, C)
    slot_t = out.slot_token.asnumpy()[0]                     # (E, C)
    tokens = [set(slot_t[e][slot_w[e] != 0].tolist()) for e in range(3)]
    assert tokens[0] == {0, 1, 2, 3}                         # expert 0: the four first choices only
    assert set(range(4, 8)) <= tokens[1] and set(range(4, 8)) <= tokens[2]   # the tie: both choices kept
    assert set(range(8, n)) <= tokens[1]                     # every first choice is kept
    kept = len(tokens[2] - set(range(4, 8))) / (n - 8)       # second choices of the 0.25-gate tokens
    assert abs(kept - 0.5) < 6 * math.sqrt(0.25 / (n - 8)), kept


def noisy_router(rng, k, noise, coefs=(0.0, 0.0, 0.5, 0.5), eps=0.0):
    cfg = make_cfg(router="noisy_topk", top_k=k, num_experts=5, capacity_factor_train=5.0,
                   capacity_factor_eval=5.0, load_balance_coef=coefs[0], z_loss_coef=coefs[1],
                   importance_coef=coefs[2], load_coef=coefs[3], noise_epsilon=eps)
    router = NoisyTopKRouter(cfg)
    assert not router.gate.weight.asnumpy().any() and not router.noise.weight.asnumpy().any()   # paper's init
    w_g, w_n = rng.normal(size=(5, H)), rng.normal(size=(5, H)) * 0.5
    set_weight(router.gate.weight, w_g)
    set_weight(router.noise.weight, w_n)
    router.sample_noise = FixedNoise(noise)
    return router, w_g, w_n


def test_noisy_topk_is_shazeer_equations(rng, k=2, eps=0.01):
    x = rng.normal(size=(1, 9, H))
    noise = rng.normal(size=(1, 9, 5))
    router, w_g, w_n = noisy_router(rng, k, noise, eps=eps)
    router.set_train(True)
    out = router(Tensor(x.astype(np.float32)))
    gates, imp, load = ref.noisy_topk(x[0], w_g.T, w_n.T, k, noise[0], training=True, noise_epsilon=eps)
    np.testing.assert_allclose(out.probs.asnumpy()[0], gates, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.losses.asnumpy()[2:], [imp, load], rtol=1e-4, atol=1e-6)
    # no noise at evaluation: G(x) = Softmax(KeepTopK(x W_g, k)), load from counts
    router.set_train(False)
    out = router(Tensor(x.astype(np.float32)))
    gates, imp, load = ref.noisy_topk(x[0], w_g.T, w_n.T, k, noise[0], training=False)
    np.testing.assert_allclose(out.probs.asnumpy()[0], gates, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.losses.asnumpy()[2:], [imp, load], rtol=1e-4, atol=1e-6)


class LoadLoss(nn.Cell):
    def __init__(self, router):
        super().__init__()
        self.router = router

    def construct(self, x):
        return self.router(x)[4]                                          # aux_loss = w_imp * L_imp + w_load * L_load


def test_noisy_topk_gradients_reach_w_noise_through_load_loss(rng):
    """d(aux)/dW_noise and d(aux)/dW_g against central finite differences of the numpy equations."""
    x = rng.normal(size=(1, 9, H))
    noise = rng.normal(size=(1, 9, 5))
    router, w_g, w_n = noisy_router(rng, 2, noise, coefs=(0.0, 0.0, 0.0, 1.0))    # load loss only
    router.set_train(True)
    net = LoadLoss(router)
    grads = ms.grad(net, grad_position=None, weights=[router.gate.weight, router.noise.weight])(
        Tensor(x.astype(np.float32)))
    g_gate, g_noise = (g.asnumpy() for g in grads)

    def f(wg, wn):
        return ref.noisy_topk(x[0], wg.T, wn.T, 2, noise[0], training=True)[2]

    step = 1e-6
    num_noise = np.zeros_like(w_n)
    num_gate = np.zeros_like(w_g)
    for idx in np.ndindex(*w_n.shape):
        d = np.zeros_like(w_n)
        d[idx] = step
        num_noise[idx] = (f(w_g, w_n + d) - f(w_g, w_n - d)) / (2 * step)
        num_gate[idx] = (f(w_g + d, w_n) - f(w_g - d, w_n)) / (2 * step)
    assert np.abs(num_noise).max() > 1e-3, "the load loss should depend on W_noise"
    np.testing.assert_allclose(g_noise, num_noise, rtol=2e-3, atol=2e-5)
    np.testing.assert_allclose(g_gate, num_gate, rtol=2e-3, atol=2e-5)


def test_expert_choice_matches_numpy(rng):
    cfg = make_cfg(router="expert_choice", top_k=1, capacity_factor_eval=1.0)
    router = ExpertChoiceRouter(cfg)
    w = rng.normal(size=(4, H))
    set_weight(router.gate.weight, w)
    router.set_train(False)
    x = rng.normal(size=(2, 10, H))
    out = router(Tensor(x.astype(np.float32)))
    probs = ref.softmax(x @ w.T)
    capacity = math.ceil(10 / 4)
    assert out.slot_token.shape == (2, 4, capacity)
    chosen_any = np.zeros((2, 10), bool)
    for g in range(2):
        for e in range(4):
            want = ref.topk_desc(probs[g, :, e], capacity)
            np.testing.assert_array_equal(out.slot_token.asnumpy()[g, e], want)
            np.testing.assert_allclose(out.slot_weight.asnumpy()[g, e], probs[g, want, e], rtol=1e-5)
            chosen_any[g, want] = True
    assert float(out.dropped.asnumpy()) == pytest.approx(1 - chosen_any.mean(), abs=1e-6)
    np.testing.assert_allclose(out.load.asnumpy(), np.full(4, 0.25))
