"""Fused MoE routing (C++ aot kernel on CPU) against the composite router and an independent numpy transcription of
GShard token-choice routing; gradients; the router_impl switch through TopKRouter, MoELayer and a tiny Switch
Transformer; errors; the Ascend selection (backend choice, and the index mapping onto a numpy transcription of
MoeInitRoutingV2 on CPU; the real op on an NPU only).

Tolerances: integer routing (expert_index, position, kept, slot_token) exact. Fused vs composite: gates and
slot_weight bitwise equal (the same float32 values gathered or scattered, the same division), gradients within
1e-7 absolute (the composite's scatter/topk backward and the fused gather backward add the same terms, possibly in
another order). Against float64 numpy: 1e-6 absolute on gates/weights (float32 rounding of values <= 1), gradients
1e-5 relative. Layer and model outputs/gradients, fused vs composite: rtol 1e-5, atol 1e-6 (identical routing
and the same ops downstream, but the gate gradient is accumulated by a different backward (topk/scatter vs
gather), which reorders float32 sums: measured differences are a few ulp, e.g. 2e-6 on a weight gradient of 8).

Inputs are random softmax rows (no ties at the top-k boundary); the kernel's own tie rule (lower expert index
first) is tested separately, because ops.topk on CPU orders ties in an unspecified way.

The case sweeps run in PyNative mode (the same cells; ~20x faster than compiling two graphs per case); one parity
case, one gradient case, the router, the layer and the model run in GRAPH_MODE, where training runs.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, nn, ops

from ms_llm.config import ConfigError, ModelConfig, MoEConfig
from ms_llm.kernels import MOE_ROUTING_FIELDS, FusedMoERouting, ReferenceMoERouting, make_moe_routing
from ms_llm.kernels.moe_routing import resolve_moe_routing_impl, select_backend
from ms_llm.moe import MoELayer
from ms_llm.moe.router import ROUTER_FIELDS, TopKRouter

ON_ASCEND = ms.get_context("device_target") == "Ascend"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INT_FIELDS = ("expert_index", "position", "kept", "slot_token")


# ----------------------------------------------------------------------------- independent numpy transcription
def np_route(probs, k, capacity, normalize):
    """GShard routing per group, written loop by loop from the contract (float64).

    Returns dict of the MOE_ROUTING_FIELDS: top-k largest first (ties: lower index first), positions counted over
    all first choices of the group in token order, then second choices, ...; kept iff position < capacity; slot
    tables (G, E, C) with token 0 / weight 0 in empty slots.
    """
    g_count, t_count, e_count = probs.shape
    p = probs.astype(np.float64)
    out = {n: [] for n in MOE_ROUTING_FIELDS}
    for g in range(g_count):
        index = np.array([np.argsort(-p[g, t], kind="stable")[:k] for t in range(t_count)]).reshape(t_count, k)
        gates = np.take_along_axis(p[g], index, 1)
        if normalize:
            gates = gates / gates.sum(1, keepdims=True)
        position = np.zeros((t_count, k), np.int64)
        filled = np.zeros(e_count, np.int64)
        slot_token = np.zeros((e_count, capacity), np.int64)
        slot_weight = np.zeros((e_count, capacity))
        for j in range(k):
            for t in range(t_count):
                e = index[t, j]
                position[t, j] = filled[e]
                if filled[e] < capacity:
                    slot_token[e, filled[e]] = t
                    slot_weight[e, filled[e]] = gates[t, j]
                filled[e] += 1
        for name, value in zip(MOE_ROUTING_FIELDS, (index, gates, position, (position < capacity).astype(np.float64),
                                                    slot_token, slot_weight)):
            out[name].append(value)
    return {n: np.stack(v) for n, v in out.items()}


def np_grad(probs, ref, k, normalize, w_slot, v_gate):
    """d/dprobs of sum(slot_weight * w_slot) + sum(gates * v_gate), analytic (float64)."""
    g_count, t_count, _ = probs.shape
    p = probs.astype(np.float64)
    grad = np.zeros_like(p)
    for g in range(g_count):
        for t in range(t_count):
            idx = ref["expert_index"][g, t]
            # upstream gradient of each gate: its own term plus the slot it occupies (if kept)
            u = v_gate[g, t].astype(np.float64).copy()
            for j in range(k):
                if ref["kept"][g, t, j]:
                    u[j] += w_slot[g, idx[j], ref["position"][g, t, j]]
            chosen = p[g, t, idx]
            if normalize:
                s = chosen.sum()
                for i in range(k):
                    grad[g, t, idx[i]] += u[i] / s - np.sum(u * chosen) / s ** 2
            else:
                for i in range(k):
                    grad[g, t, idx[i]] += u[i]
    return grad


def random_probs(rng, g, t, e, temperature=1.0):
    logits = rng.normal(size=(g, t, e)) * temperature
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return (z / z.sum(-1, keepdims=True)).astype(np.float32)


class Route(nn.Cell):
    def __init__(self, cell, capacity):
        super().__init__()
        self.cell = cell
        self.capacity = capacity

    def construct(self, probs):
        return self.cell(probs, self.capacity)


class RouteLoss(nn.Cell):
    def __init__(self, cell, capacity):
        super().__init__()
        self.cell = cell
        self.capacity = capacity

    def construct(self, probs, w_slot, v_gate):
        out = self.cell(probs, self.capacity)
        return ops.sum(out[5] * w_slot) + ops.sum(out[1] * v_gate)


class GradOf(nn.Cell):
    def __init__(self, net):
        super().__init__()
        self.net = net
        self.grad = ops.GradOperation()

    def construct(self, *args):
        return self.grad(self.net)(*args)


def run(impl, probs, k, capacity, normalize):
    e = probs.shape[-1]
    out = Route(make_moe_routing(impl, e, k, normalize), capacity)(Tensor(probs))
    return {n: o.asnumpy() for n, o in zip(MOE_ROUTING_FIELDS, out)}


def assert_same(a, b, exact_floats=True, atol=1e-6):
    for name in MOE_ROUTING_FIELDS:
        if name in INT_FIELDS or exact_floats:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        else:
            np.testing.assert_allclose(a[name], b[name], rtol=0, atol=atol, err_msg=name)


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("k,normalize", [(1, False), (2, True), (2, False), (3, True)])
@pytest.mark.parametrize("capacity_kind", ["ample", "tight", "one"])
def test_fused_matches_composite_and_numpy(pynative, rng, k, normalize, capacity_kind):
    g, t, e = 3, 24, 5
    probs = random_probs(rng, g, t, e, temperature=1.5)
    capacity = {"ample": t, "tight": math.ceil(t * k * 0.75 / e), "one": 1}[capacity_kind]
    fused = run("fused", probs, k, capacity, normalize)
    composite = run("reference", probs, k, capacity, normalize)
    want = np_route(probs, k, capacity, normalize)
    assert_same(fused, composite)
    assert_same({n: v.astype(np.float64) for n, v in fused.items()}, want, exact_floats=False, atol=1e-6)
    dropped = 1.0 - fused["kept"].mean()
    assert (dropped == 0.0) if capacity_kind == "ample" else (dropped > 0.0)   # the case really drops tokens


def test_all_tokens_to_one_expert_and_an_idle_expert(pynative, rng):
    """Expert 1 takes every first choice (so tokens beyond capacity are dropped, in token order), expert 3 is never
    chosen: its slots are empty (token 0, weight 0, slot_choice padding) in both implementations."""
    g, t, e, k, capacity = 2, 10, 4, 2, 3
    logits = rng.normal(size=(g, t, e)) * 0.1
    logits[:, :, 1] += 5.0
    logits[:, :, 3] -= 5.0
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    probs = probs.astype(np.float32)
    fused = run("fused", probs, k, capacity, True)
    assert_same(fused, run("reference", probs, k, capacity, True))
    assert_same({n: v.astype(np.float64) for n, v in fused.items()}, np_route(probs, k, capacity, True),
                exact_floats=False)
    assert np.all(fused["expert_index"][:, :, 0] == 1)
    np.testing.assert_array_equal(fused["position"][:, :, 0], np.broadcast_to(np.arange(t), (g, t)))
    np.testing.assert_array_equal(fused["kept"][:, :, 0], np.broadcast_to(np.arange(t) < capacity, (g, t)))
    np.testing.assert_array_equal(fused["slot_token"][:, 1], np.broadcast_to(np.arange(capacity), (g, capacity)))
    np.testing.assert_array_equal(fused["slot_token"][:, 3], 0)
    np.testing.assert_array_equal(fused["slot_weight"][:, 3], 0.0)


def test_large_group_parallel_passes(pynative, rng):
    """Enough work that, with two or more CPUs, the kernel splits pass 1 (G*T*E = 2^20 probabilities) over token
    ranges and pass 2 (G*T*k = 2^18 choices) over groups: one thread per 2^17 elements of work."""
    g, t, e, k = 4, 32768, 8, 2
    probs = random_probs(rng, g, t, e)
    capacity = math.ceil(t * k * 1.25 / e)
    assert_same(run("fused", probs, k, capacity, True), run("reference", probs, k, capacity, True))


def test_kernel_tie_rule_is_lower_expert_first(pynative):
    """The documented tie rule of the CPU kernel (ops.topk leaves the order of ties unspecified, so the composite
    is not a reference here): equal probabilities rank the lower expert index first, for k = 1, 2 and the general
    insertion path (k = 3)."""
    rows = np.array([[0.2, 0.3, 0.3, 0.1, 0.1],
                     [0.2, 0.2, 0.2, 0.2, 0.2],
                     [0.1, 0.1, 0.3, 0.3, 0.2],
                     [0.25, 0.1, 0.25, 0.15, 0.25]], np.float32)[None]    # (1, 4, 5)
    for k in (1, 2, 3):
        got = run("fused", rows, k, 4, False)
        want = np_route(rows, k, 4, False)     # np.argsort(kind="stable") on -p: lower index first among equals
        np.testing.assert_array_equal(got["expert_index"], want["expert_index"], err_msg=f"k={k}")
        np.testing.assert_array_equal(got["position"], want["position"], err_msg=f"k={k}")


@pytest.mark.parametrize("k,normalize,capacity,mode", [(1, False, 3, "pynative"), (2, False, 8, "pynative"),
                                                       (2, True, 3, "graph")])
def test_gradients_match_composite_and_analytic(rng, k, normalize, capacity, mode):
    g, t, e = 2, 12, 4
    probs = random_probs(rng, g, t, e, temperature=1.5)
    w_slot = rng.normal(size=(g, e, capacity)).astype(np.float32)
    v_gate = rng.normal(size=(g, t, k)).astype(np.float32)
    grads = {}
    ms.set_context(mode=ms.PYNATIVE_MODE if mode == "pynative" else ms.GRAPH_MODE)
    try:
        for impl in ("fused", "reference"):
            net = GradOf(RouteLoss(make_moe_routing(impl, e, k, normalize), capacity))
            grads[impl] = net(Tensor(probs), Tensor(w_slot), Tensor(v_gate)).asnumpy()
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    np.testing.assert_allclose(grads["fused"], grads["reference"], rtol=0, atol=1e-7)
    want = np_grad(probs, np_route(probs, k, capacity, normalize), k, normalize, w_slot, v_gate)
    np.testing.assert_allclose(grads["fused"], want, rtol=1e-5, atol=1e-6)
    assert np.count_nonzero(grads["fused"]) >= g * t          # every token's chosen gates receive a gradient


def test_fused_in_graph_mode(rng):
    """GRAPH_MODE (the training mode): one tight-capacity case, both implementations compiled, and numpy."""
    assert ms.get_context("mode") == ms.GRAPH_MODE
    probs = random_probs(rng, 2, 9, 4)
    fused = run("fused", probs, 2, 3, True)
    assert_same(fused, run("reference", probs, 2, 3, True))
    assert_same({n: v.astype(np.float64) for n, v in fused.items()}, np_route(probs, 2, 3, True),
                exact_floats=False)
    assert fused["kept"].min() == 0.0


# ----------------------------------------------------------------------------- errors
def test_errors_name_the_offending_value():
    with pytest.raises(ValueError, match="top_k=5 is greater than num_experts=4"):
        FusedMoERouting(4, 5)
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        ReferenceMoERouting(4, 0)
    with pytest.raises(ValueError, match="unknown moe routing impl 'fast'"):
        make_moe_routing("fast", 4, 1)
    probs = Tensor(np.full((2, 6, 4), 0.25, np.float32))
    for impl in ("fused", "reference"):
        with pytest.raises(ValueError, match=r"capacity must be an int >= 1, got 0"):
            Route(make_moe_routing(impl, 4, 1), 0)(probs)
        with pytest.raises(ValueError, match=r"expects probs of shape \(G, T, E\).*\(6, 4\)"):
            Route(make_moe_routing(impl, 4, 1), 2)(Tensor(np.full((6, 4), 0.25, np.float32)))
        with pytest.raises(ValueError, match=r"must be float32, got Float16 for probs \(2, 6, 4\)"):
            Route(make_moe_routing(impl, 4, 1), 2)(Tensor(np.full((2, 6, 4), 0.25, np.float16)))
        with pytest.raises(ValueError, match=r"probs \(2, 6, 4\) has 4 experts .* num_experts=8"):
            Route(make_moe_routing(impl, 8, 1), 2)(probs)


def test_config_switch_is_validated():
    assert MoEConfig(num_experts=4).router_impl == "auto"
    assert MoEConfig(num_experts=4, router="expert_choice").router_impl == "auto"   # auto: only 'topk' routes fused
    with pytest.raises(ConfigError, match=r"moe.router_impl: 'fast' is not one of \['auto', 'fused', 'reference'\]"):
        MoEConfig(num_experts=4, router_impl="fast")
    with pytest.raises(ConfigError, match=r"moe.router_impl: 'fused' is implemented for router 'topk' only"):
        MoEConfig(num_experts=4, router="expert_choice", router_impl="fused")


def test_auto_resolution(monkeypatch):
    from ms_llm.kernels import moe_routing
    assert resolve_moe_routing_impl("reference") == "reference"
    assert resolve_moe_routing_impl("fused") == "fused"
    monkeypatch.setattr(moe_routing.ms, "get_context", lambda key: "CPU")
    assert resolve_moe_routing_impl("auto") == "fused"
    assert isinstance(make_moe_routing("auto", 4, 1), FusedMoERouting)
    monkeypatch.setattr(moe_routing.ms, "get_context", lambda key: "Ascend")
    assert resolve_moe_routing_impl("auto") == "reference"     # what semi-auto parallelism shards
    assert isinstance(make_moe_routing("auto", 4, 1), ReferenceMoERouting)
    with pytest.raises(ValueError, match="unknown moe routing impl 'sort'; valid: auto, reference, fused"):
        make_moe_routing("sort", 4, 1)


# ----------------------------------------------------------------------------- router, layer and model switch
H, F, E = 8, 12, 4


def moe_cfg(**moe):
    moe.setdefault("num_experts", E)
    return ModelConfig(arch="glam", hidden_size=H, num_heads=2, ffn_hidden_size=F, dropout=0.0, activation="relu",
                       use_bias=False, moe=MoEConfig(**moe))


def copy_weights(src: nn.Cell, dst: nn.Cell):
    params = dict(src.parameters_and_names())
    for name, p in dst.parameters_and_names():
        p.set_data(Tensor(params[name].asnumpy()))


def randomize(cell, rng):
    for p in cell.trainable_params():
        p.set_data(Tensor((rng.normal(size=p.shape) * 0.5).astype(np.float32)))


class LayerLoss(nn.Cell):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def construct(self, x, w):
        y, aux = self.layer(x)
        return ops.sum(y * w) + aux


class ForwardAndGrads(nn.Cell):
    """One graph: the layer's (y, aux) and the gradients of sum(y * w) + aux w.r.t. x and every weight."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        self.loss = LayerLoss(layer)
        self.params = ms.ParameterTuple(layer.trainable_params())
        self.grad = ops.GradOperation(get_all=True, get_by_list=True)

    def construct(self, x, w):
        y, aux = self.layer(x)
        grads = self.grad(self.loss, self.params)(x, w)
        return y, aux, grads


class ModelLoss(nn.Cell):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def construct(self, src_ids, src_mask, tgt_ids, tgt_mask, r):
        out = self.model(src_ids, src_mask, tgt_ids, tgt_mask)      # a tuple in a graph, a ModelOutput in PyNative
        return ops.sum(out[0] * r) + out[1]


class ModelForwardAndGrads(nn.Cell):
    """One graph: an encoder-decoder's (logits, aux) and the weight gradients of sum(logits * r) + aux."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.loss = ModelLoss(model)
        self.params = ms.ParameterTuple(model.trainable_params())
        self.grad = ops.GradOperation(get_by_list=True)

    def construct(self, src_ids, src_mask, tgt_ids, tgt_mask, r):
        out = self.model(src_ids, src_mask, tgt_ids, tgt_mask)
        grads = self.grad(self.loss, self.params)(src_ids, src_mask, tgt_ids, tgt_mask, r)
        return out[0], out[1], grads


def test_topk_router_outputs_identical(rng, k=2, factor=0.75):
    """Every ROUTER_FIELDS output (slots, losses, load, dropped) at evaluation, tight capacity, top-2 normalised.
    (Top-1 and training mode are covered by the tiny Switch Transformer below.)"""
    x = Tensor(rng.normal(size=(2, 10, H)).astype(np.float32))
    outs, routers = {}, {}
    for impl in ("reference", "fused"):
        router = TopKRouter(moe_cfg(top_k=k, router_impl=impl, capacity_factor_eval=factor, importance_coef=0.1,
                                    load_coef=0.1))
        if routers:
            copy_weights(routers["reference"], router)
        else:
            randomize(router, rng)
        router.set_train(False)
        routers[impl] = router
        out = router(x)                                                       # a ModelOutput at top level
        outs[impl] = [out[name].asnumpy() for name in ROUTER_FIELDS]
    assert isinstance(routers["reference"].routing, ReferenceMoERouting) and isinstance(routers["fused"].routing,
                                                                                      FusedMoERouting)
    for name, a, b in zip(ROUTER_FIELDS, outs["reference"], outs["fused"]):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-7, err_msg=name)
    assert outs["fused"][ROUTER_FIELDS.index("dropped")] > 0


def test_sampling_policy_keeps_the_composite_while_training(rng):
    """GShard's random second-expert policy is not part of the fused op: training takes the composite branch (it
    compiles and routes every first choice), evaluation the fused one."""
    x = Tensor(rng.normal(size=(2, 10, H)).astype(np.float32))
    router = TopKRouter(moe_cfg(top_k=2, router_impl="fused", second_expert_policy="sampling",
                                capacity_factor_train=4.0))
    router.set_train(True)
    out = router(x)                                                      # capacity 10: nothing is dropped
    slot_token, slot_weight = out["slot_token"].asnumpy(), out["slot_weight"].asnumpy()
    assert slot_token.shape == (2, E, 10)
    for g in range(2):
        assert set(slot_token[g][slot_weight[g] > 0].tolist()) == set(range(10))
    router.set_train(False)
    out = router(x)
    assert out["slot_token"].shape == (2, E, 10) and float(out["dropped"].asnumpy()) >= 0.0   # eval, fused


def test_moe_layer_forward_backward_identical(rng, k=2):
    """MoELayer with tight capacity (drops) in training mode, GLaM top-2: output, aux loss, input and weight
    gradients."""
    x = rng.normal(size=(2, 12, H)).astype(np.float32)
    w = rng.normal(size=(2, 12, H)).astype(np.float32)
    results = {}
    base = None
    for impl in ("reference", "fused"):
        layer = MoELayer(moe_cfg(top_k=k, router_impl=impl, capacity_factor_train=0.75, importance_coef=0.1))
        if base is None:
            randomize(layer, rng)
            base = layer
        else:
            copy_weights(base, layer)
        layer.set_train(True)
        y, aux, (in_grads, w_grads) = ForwardAndGrads(layer)(Tensor(x), Tensor(w))
        dropped = float(layer.dropped_stat.asnumpy())
        results[impl] = (y.asnumpy(), aux.asnumpy(), in_grads[0].asnumpy(), [g.asnumpy() for g in w_grads],
                         dropped)
    ref, fused = results["reference"], results["fused"]
    assert fused[4] == ref[4] > 0.0                                      # tokens were dropped, identically
    for name, a, b in (("y", ref[0], fused[0]), ("aux", ref[1], fused[1]), ("dx", ref[2], fused[2])):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=name)
    names = [p.name for p in base.trainable_params()]
    for name, a, b in zip(names, ref[3], fused[3]):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=name)
        assert np.any(a != 0), f"no gradient reached {name}"


def test_tiny_switch_forward_backward_identical(pynative, rng):
    """A one-layer-per-stack Switch Transformer (top-1) from the shipped tiny config, set via the YAML override
    ``model.moe.router_impl``, in training mode with tight capacity: logits, aux loss and every weight gradient are
    the same with 'reference' and 'fused'. PyNative (two model graphs would take ~15 s to compile here; the
    layer test above covers GRAPH_MODE)."""
    from ms_llm.config import load_config
    from ms_llm.models.switch import SwitchTransformer
    overrides = ["model.num_layers=1", "model.num_decoder_layers=1", "model.moe.moe_every=1",
                 "model.moe.moe_offset=0", "model.moe.jitter_eps=0.0", "model.moe.capacity_factor_train=0.5"]
    b, s_src, s_tgt = 2, 8, 6
    src = Tensor(rng.integers(3, 24, size=(b, s_src)).astype(np.int32))
    tgt = Tensor(rng.integers(3, 24, size=(b, s_tgt)).astype(np.int32))
    src_mask = Tensor(np.ones((b, s_src), np.float32))
    tgt_mask = Tensor(np.ones((b, s_tgt), np.float32))
    proj = Tensor(rng.normal(size=(b, s_tgt, 24)).astype(np.float32))


    results = {}
    base = None
    for impl in ("reference", "fused"):
        cfg = load_config(os.path.join(ROOT, "configs", "switch", "tiny.yaml"),
                          overrides + [f"model.moe.router_impl={impl}"])
        model = SwitchTransformer(cfg.model)
        n_fused = sum(isinstance(c, FusedMoERouting) for _, c in model.cells_and_names())
        assert n_fused == (2 if impl == "fused" else 0)                  # the encoder's and decoder's MoE layer
        if base is None:
            randomize(model, rng)
            base = model
        else:
            copy_weights(base, model)
        model.set_train(True)
        logits, aux, grads = ModelForwardAndGrads(model)(src, src_mask, tgt, tgt_mask, proj)
        results[impl] = (logits.asnumpy(), aux.asnumpy(), [g.asnumpy() for g in grads])
    ref, fused = results["reference"], results["fused"]
    np.testing.assert_allclose(fused[0], ref[0], rtol=1e-5, atol=1e-6, err_msg="logits")
    np.testing.assert_allclose(fused[1], ref[1], rtol=1e-5, atol=1e-6, err_msg="aux_loss")
    for p, a, g in zip(base.trainable_params(), ref[2], fused[2]):
        np.testing.assert_allclose(g, a, rtol=1e-5, atol=1e-6, err_msg=p.name)
    router_grads = [a for p, a in zip(base.trainable_params(), ref[2]) if "router" in p.name]
    assert router_grads and all(np.any(a != 0) for a in router_grads)


# ----------------------------------------------------------------------------- Ascend selection
def test_backend_selection():
    """CPU runs the C++ kernel; Ascend A2/A3 the built-in MoeInitRoutingV2; the first-generation 910 (no
    MoeInitRoutingV2 in CANN) the composite; other devices are refused with the device named."""
    if not ON_ASCEND:
        assert FusedMoERouting(4, 2).backend == "cpu_kernel"
    assert select_backend("CPU") == "cpu_kernel"
    assert select_backend("Ascend", "ascend910b") == "ascend_moe_init_routing_v2"
    assert select_backend("Ascend", "ascend910_93") == "ascend_moe_init_routing_v2"
    assert select_backend("Ascend", "ascend910") == "reference"
    with pytest.raises(ValueError, match="device_target 'CPU' or 'Ascend', got 'GPU'"):
        select_backend("GPU")


def fake_moe_init_routing_v2(x, expert_idx, active_num, expert_capacity, expert_num, drop_pad_mode,
                             count_flag, before_capacity_flag):
    """MoeInitRoutingV2 in drop/pad mode transcribed in numpy from its MindSpore docstring: rows of the flattened
    expert_idx stable-sorted by expert, the first `expert_capacity` of each expert copied into expanded_x
    (expert_num, C, H) (zeros elsewhere), expanded_row_idx = each row's destination expert * C + slot or -1."""
    assert (active_num, drop_pad_mode, count_flag, before_capacity_flag) == (0, 1, 0, False)
    xs, idx = x.asnumpy(), expert_idx.asnumpy()
    rows, k = idx.shape
    flat = idx.reshape(-1)
    expanded = np.zeros((expert_num, expert_capacity, xs.shape[1]), xs.dtype)
    dest = np.full(flat.shape, -1, np.int32)
    filled = np.zeros(expert_num, np.int64)
    for r in np.argsort(flat, kind="stable"):
        e = flat[r]
        if filled[e] < expert_capacity:
            expanded[e, filled[e]] = xs[r // k]
            dest[r] = e * expert_capacity + filled[e]
        filled[e] += 1
    zeros = Tensor(np.zeros(expert_num, np.int32))
    return Tensor(expanded), Tensor(dest), zeros, zeros


def test_fake_moe_init_routing_v2_reproduces_the_docstring_example():
    x = Tensor(np.array([[0.1, 0.2, 0.3], [0.2, 0.7, 0.8], [0.3, 0.3, 0.5]], np.float32))
    idx = Tensor(np.array([[0, 1, 1], [2, 1, 1], [0, 0, 0]], np.int32))
    out, row_idx, _, _ = fake_moe_init_routing_v2(x, idx, 0, 2, 3, 1, 0, False)
    want = np.array([[[0.1, 0.2, 0.3], [0.3, 0.3, 0.5]], [[0.1, 0.2, 0.3], [0.1, 0.2, 0.3]],
                     [[0.2, 0.7, 0.8], [0.0, 0.0, 0.0]]], np.float32)
    np.testing.assert_array_equal(out.asnumpy(), want)
    np.testing.assert_array_equal(row_idx.asnumpy(), [0, 2, 3, 4, -1, -1, 1, -1, -1])


@pytest.mark.parametrize("k,capacity", [(1, 3), (2, 2), (3, 4), (2, 40)])
def test_ascend_mapping_on_documented_semantics(pynative, monkeypatch, rng, k, capacity):
    """The index arithmetic of the Ascend path (row layout, payload, decoding), run on CPU in PyNative with
    ops.moe_init_routing_v2 replaced by the numpy transcription above: equal to the CPU kernel except position of
    dropped choices (capacity). The real op on an NPU is checked by the ascend-marked test below."""
    from ms_llm.kernels import moe_routing
    monkeypatch.setattr(moe_routing.ops, "moe_init_routing_v2", fake_moe_init_routing_v2)
    g, t, e = 3, 20, 5
    probs = random_probs(rng, g, t, e, temperature=1.5)
    spec = Tensor(np.zeros((k, capacity), np.int32))
    got = [o.asnumpy() for o in moe_routing._AscendMoERouting(k)(Tensor(probs), spec)]
    want = [o.asnumpy() for o in moe_routing._CpuMoERouting()(Tensor(probs), spec)]
    want[1] = np.minimum(want[1], capacity)
    for name, a, b in zip(("expert_index", "position", "kept", "slot_token", "slot_choice"), got, want):
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert (capacity == 40) == (want[2].min() == 1.0)                     # drops in every case but the ample one


@pytest.mark.ascend
@pytest.mark.parametrize("k,capacity", [(1, 3), (2, 2), (2, 40)])
def test_ascend_builtin_routing_matches_composite(rng, k, capacity):
    """On an A2/A3 NPU, FusedMoERouting selects ops.topk + ops.moe_init_routing_v2; everything equals the
    composite except position of dropped choices, which MoeInitRoutingV2 cannot report (it returns capacity there).
    On a first-generation 910 it selects the composite, which then trivially agrees."""
    g, t, e = 2, 20, 4
    probs = random_probs(rng, g, t, e, temperature=1.5)
    fused = run("fused", probs, k, capacity, k > 1)
    composite = run("reference", probs, k, capacity, k > 1)
    if FusedMoERouting(e, k).backend == "ascend_moe_init_routing_v2":
        composite["position"] = np.minimum(composite["position"], capacity)
    assert_same(fused, composite, exact_floats=False, atol=1e-6)
