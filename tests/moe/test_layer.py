"""MoELayer (route -> dispatch -> experts -> combine) against a numpy mixture of expert FFNs; batched experts;
dispatcher round trip; capacity edge cases; load statistics; sharding tables; gradients.

Tolerances: float32 against float64 references, rtol 1e-4 / atol 1e-5 on outputs (sums of a few products of
O(1) numbers); gradients against central finite differences rtol 2e-3.
"""
import math

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn

from ms_llm.config import ModelConfig, MoEConfig, ParallelConfig
from ms_llm.moe import Dispatcher, Experts, MoELayer, moe_stats
from ms_llm.parallel.sharding import Sharder, apply
import moe_numpy_ref as ref

H, F, E = 8, 12, 4


def make_cfg(activation="relu", use_bias=False, **moe):
    moe.setdefault("num_experts", E)
    return ModelConfig(arch="glam", hidden_size=H, num_heads=2, ffn_hidden_size=F, dropout=0.0,
                       activation=activation, use_bias=use_bias, moe=MoEConfig(**moe))


def randomize(layer, rng):
    """Random weights (biases included) so that a swapped or ignored tensor changes the output."""
    for p in layer.trainable_params():
        p.set_data(Tensor((rng.normal(size=p.shape) * 0.5).astype(np.float32)))


def weights(layer):
    ex = layer.experts
    get = lambda p: None if p is None else p.asnumpy().astype(np.float64)   # noqa: E731
    return dict(w_gate=layer.router.gate.weight.asnumpy().astype(np.float64), w_in=get(ex.w_in),
                w_out=get(ex.w_out), w_glu=get(ex.w_gate), b_in=get(ex.b_in), b_out=get(ex.b_out))


def expert_out(w, e, x, activation):
    """Expert e of the numpy model on tokens x (N, H)."""
    return ref.ffn(x, w["w_in"][e], w["w_out"][e], activation, w_gate=None if w["w_glu"] is None else w["w_glu"][e],
                   b_in=None if w["b_in"] is None else w["b_in"][e, 0],
                   b_out=None if w["b_out"] is None else w["b_out"][e, 0])


def numpy_layer(x, w, k, capacity, activation, router="topk", normalize=True):
    """y (G, T, H) of the paper's MoE: y = sum over kept choices of gate * expert(x)."""
    probs = ref.softmax(x @ w["w_gate"].T)
    y = np.zeros_like(x)
    for g in range(x.shape[0]):
        if router == "expert_choice":
            for e in range(E):
                for t in ref.topk_desc(probs[g, :, e], capacity):
                    y[g, t] += probs[g, t, e] * expert_out(w, e, x[g, t:t + 1], activation)[0]
            continue
        index, combine, _, kept = ref.route_topk(probs[g], k, capacity)
        if normalize and k > 1:
            combine = combine / np.take_along_axis(probs[g], index, 1).sum(1, keepdims=True)
        for t in range(x.shape[1]):
            for j in range(k):
                if kept[t, j]:
                    y[g, t] += combine[t, j] * expert_out(w, index[t, j], x[g, t:t + 1], activation)[0]
    return y


@pytest.mark.parametrize("router,k,activation,bias", [("topk", 1, "relu", False), ("topk", 2, "swiglu", True),
                                                      ("expert_choice", 1, "gelu", False)])
def test_layer_matches_numpy_mixture(rng, router, k, activation, bias):
    cfg = make_cfg(activation=activation, use_bias=bias, router=router, top_k=k, capacity_factor_eval=1.0)
    layer = MoELayer(cfg)
    randomize(layer, rng)
    layer.set_train(False)
    x = rng.normal(size=(2, 10, H))
    y, aux = layer(Tensor(x.astype(np.float32)))
    capacity = math.ceil(10 * k / E)
    want = numpy_layer(x, weights(layer), k, capacity, activation.replace("swiglu", "silu"), router)
    np.testing.assert_allclose(y.asnumpy(), want, rtol=1e-4, atol=1e-5)
    assert y.dtype == ms.float32 and aux.shape == ()
    stats = moe_stats(layer)
    if router == "topk":
        assert stats["moe/MoELayer/dropped"] > 0, "capacity factor 1.0 should drop some tokens here"


def test_capacity_edge_cases(rng):
    """Capacity >= tokens drops nothing (the layer equals the dense mixture; expert dropout only in training); with
    every token routed to one expert, tokens past its capacity get exactly 0 (the residual carries them) and idle
    experts are harmless."""
    layer = MoELayer(make_cfg(capacity_factor_eval=100.0, capacity_factor_train=100.0, expert_dropout=0.5))
    randomize(layer, rng)
    layer.set_train(False)
    w = weights(layer)
    x = rng.normal(size=(1, 6, H))
    y = layer(Tensor(x.astype(np.float32)))[0].asnumpy()
    np.testing.assert_allclose(y, numpy_layer(x, w, 1, 6, "relu"), rtol=1e-4, atol=1e-5)
    assert moe_stats(layer)["moe/MoELayer/dropped"] == 0.0
    # Switch's expert dropout acts while training only (evaluation above matched the dropout-free mixture)
    layer.set_train(True)
    y1 = layer(Tensor(x.astype(np.float32)))[0].asnumpy()
    y2 = layer(Tensor(x.astype(np.float32)))[0].asnumpy()
    assert np.abs(y1 - y).max() > 1e-3 and np.abs(y1 - y2).max() > 1e-3

    one = MoELayer(make_cfg(capacity_factor_eval=1.0, min_capacity=2))      # capacity ceil(6/4)=2
    randomize(one, rng)
    gate = np.zeros((E, H), np.float32)
    gate[3] = 5.0                                                            # every token picks expert 3
    one.router.gate.weight.set_data(Tensor(gate))
    one.set_train(False)
    x = np.abs(rng.normal(size=(1, 6, H))) + 0.1
    y = one(Tensor(x.astype(np.float32)))[0].asnumpy()
    w = weights(one)
    np.testing.assert_allclose(y, numpy_layer(x, w, 1, 2, "relu"), rtol=1e-4, atol=1e-5)
    assert np.all(y[0, 2:] == 0) and np.abs(y[0, :2]).min() > 0
    stats = moe_stats(one)
    assert stats["moe/MoELayer/dropped"] == pytest.approx(4 / 6)
    assert stats["moe/MoELayer/load_e3"] == 1.0 and stats["moe/MoELayer/load_e0"] == 0.0
    assert stats["moe/MoELayer/overload"] == pytest.approx(4.0)                     # max load / mean load = 1 / (1/4)
    assert stats["moe/overload"] == pytest.approx(4.0) and stats["moe/dropped"] == pytest.approx(4 / 6)


def test_batched_experts_equal_per_expert_loop(rng):
    ex = Experts(3, H, F, "geglu", has_bias=True)
    for p in ex.trainable_params():
        p.set_data(Tensor(rng.normal(size=p.shape).astype(np.float32) * 0.5))
    x = rng.normal(size=(3, 5, H))
    got = ex(Tensor(x.astype(np.float32))).asnumpy()
    for e in range(3):
        want = ref.ffn(x[e], ex.w_in.asnumpy()[e], ex.w_out.asnumpy()[e], "gelu", w_gate=ex.w_gate.asnumpy()[e],
                       b_in=ex.b_in.asnumpy()[e, 0], b_out=ex.b_out.asnumpy()[e, 0])
        np.testing.assert_allclose(got[e], want, rtol=1e-4, atol=1e-5)


class RoundTrip(nn.Cell):
    def __init__(self, impl):
        super().__init__()
        self.dispatcher = Dispatcher(impl=impl)

    def construct(self, x, slot_token, slot_weight):
        slots = self.dispatcher.dispatch(x, slot_token)                     # (E, G*C, H)
        return slots, self.dispatcher.combine(slots, slot_token, slot_weight, x.shape[1])


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_dispatcher_round_trip(rng, impl):
    """Identity experts: combine(dispatch(x)) = (sum of the token's slot weights) * x; 0 for unrouted tokens."""
    g, t, e, c = 2, 5, 3, 2
    x = rng.normal(size=(g, t, H)).astype(np.float32)
    slot_token = np.array([[[0, 3], [1, 0], [4, 2]], [[2, 2], [0, 1], [3, 0]]], np.int32)   # (G, E, C)
    slot_weight = np.array([[[0.5, 1.0], [2.0, 0.0], [1.0, 0.25]], [[0.5, 0.5], [1.0, 1.0], [3.0, 0.0]]],
                           np.float32)
    slots, y = RoundTrip(impl)(Tensor(x), Tensor(slot_token), Tensor(slot_weight))
    for gi in range(g):
        for ei in range(e):
            for ci in range(c):
                np.testing.assert_array_equal(slots.asnumpy()[ei, gi * c + ci], x[gi, slot_token[gi, ei, ci]])
    want = np.zeros_like(x)
    for gi, ei, ci in np.ndindex(g, e, c):
        want[gi, slot_token[gi, ei, ci]] += slot_weight[gi, ei, ci] * x[gi, slot_token[gi, ei, ci]]
    np.testing.assert_allclose(y.asnumpy(), want, rtol=1e-6, atol=1e-6)


class Objective(nn.Cell):
    def __init__(self, layer, r):
        super().__init__()
        self.layer = layer
        self.r = Tensor(r.astype(np.float32))

    def construct(self, x):
        y, aux = self.layer(x)
        return (y * self.r).sum() + aux


def test_gradients_through_routing_and_experts(rng):
    """d/dW of sum(y * r) + aux for the router and expert weights, against numpy central differences (the
    router gets its gradient through the combine weights and the auxiliary losses)."""
    cfg = make_cfg(top_k=2, capacity_factor_eval=1.0, load_balance_coef=0.3, z_loss_coef=0.1)
    layer = MoELayer(cfg)
    randomize(layer, rng)
    layer.set_train(False)
    x = rng.normal(size=(1, 6, H))
    r = rng.normal(size=(1, 6, H))
    net = Objective(layer, r)
    params = [layer.router.gate.weight, layer.experts.w_in]
    got = [g.asnumpy() for g in ms.grad(net, grad_position=None, weights=params)(Tensor(x.astype(np.float32)))]
    w = weights(layer)
    capacity = math.ceil(6 * 2 / E)

    def f(wd):
        probs = ref.softmax(x @ wd["w_gate"].T)
        top1 = probs.argmax(-1)
        aux = 0.3 * ref.switch_load_balance(probs, top1) + 0.1 * ref.z_loss(x @ wd["w_gate"].T)
        return float((numpy_layer(x, wd, 2, capacity, "relu") * r).sum() + aux)

    step = 1e-6
    for name, g in zip(("w_gate", "w_in"), got):
        num = np.zeros_like(w[name])
        for idx in np.ndindex(*w[name].shape):
            plus, minus = dict(w), dict(w)
            plus[name] = w[name].copy()
            minus[name] = w[name].copy()
            plus[name][idx] += step
            minus[name][idx] -= step
            num[idx] = (f(plus) - f(minus)) / (2 * step)
        np.testing.assert_allclose(g, num, rtol=2e-3, atol=1e-4, err_msg=name)


def test_fused_and_reference_dispatch_agree(rng):
    """The layer with moe.dispatch_impl 'fused' and 'reference' (same weights): outputs, aux loss and the gradients
    of x and of every weight (router included, through the combine weights), top-2 with dropped choices (capacity
    factor 0.75). float32 sums in another order: within 1e-5 of each tensor's largest magnitude."""
    layers = [MoELayer(make_cfg(use_bias=True, top_k=2, capacity_factor_train=0.75, dispatch_impl=impl))
              for impl in ("fused", "reference")]
    randomize(layers[0], rng)
    for src, dst in zip(layers[0].trainable_params(), layers[1].trainable_params()):
        dst.set_data(src.data)
    x = Tensor(rng.normal(size=(3, 8, H)).astype(np.float32))
    r = rng.normal(size=(3, 8, H))
    results = []
    for layer in layers:
        layer.set_train(True)
        net = Objective(layer, r)
        loss, (dx, dw) = ms.value_and_grad(net, grad_position=0, weights=layer.trainable_params())(x)
        results.append([loss.asnumpy(), dx.asnumpy()] + [g.asnumpy() for g in dw])
    assert float(layers[0].dropped_stat.asnumpy()) > 0                     # the capacity dropped some choices
    for i, (a, b) in enumerate(zip(*results)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * max(1.0, np.abs(b).max()), err_msg=str(i))


def test_shard_tables_use_expert_axis():
    layer = MoELayer(make_cfg(activation="swiglu", dispatch_impl="reference"))     # auto's choice on Ascend
    par = ParallelConfig(mode="semi_auto_parallel", data_parallel=2, model_parallel=2, expert_parallel=2)
    table = apply(layer, Sharder(par))
    assert table["experts.bmm_in"] == ((2, 1, 1), (2, 1, 2))
    assert table["experts.bmm_gate"] == ((2, 1, 1), (2, 1, 2))
    assert table["experts.bmm_out"] == ((2, 1, 2), (2, 2, 1))
    assert table["dispatcher.slots.gather"] == ((2, 1, 1), (2, 1))          # groups stay on the batch axis
    assert table["dispatcher.slots.to_expert_major"] == ((2, 2, 1, 1),)    # (batch) -> (expert) sharding
    assert table["router.gate.matmul"] == ((2, 1), (1, 1))                  # the router is replicated


def test_router_stays_float32_under_float16_compute(rng):
    cfg = ModelConfig(arch="glam", hidden_size=H, num_heads=2, ffn_hidden_size=F, dropout=0.0, activation="relu",
                      compute_dtype="float16",
                      moe=MoEConfig(num_experts=E, top_k=2, capacity_factor_eval=4.0))
    layer = MoELayer(cfg)
    randomize(layer, rng)
    layer.set_train(False)
    x = rng.normal(size=(1, 6, H))
    out = layer.router(Tensor(x.astype(np.float16)))
    assert out.logits.dtype == ms.float32 and out.probs.dtype == ms.float32 and out.slot_weight.dtype == ms.float32
    w = weights(layer)
    np.testing.assert_allclose(out.probs.asnumpy()[0], ref.softmax(x[0].astype(np.float16).astype(np.float64)
                                                                    @ w["w_gate"].T), rtol=1e-5, atol=1e-6)
    y, _ = layer(Tensor(x.astype(np.float16)))
    assert y.dtype == ms.float32
    np.testing.assert_allclose(y.asnumpy(), numpy_layer(x, w, 2, 6, "relu"), rtol=1e-2, atol=1e-2)   # fp16 matmuls

