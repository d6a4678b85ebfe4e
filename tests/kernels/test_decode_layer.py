"""The fused decode layer (C++ aot kernel on CPU) and its composite reference against an independent float64 numpy
transcription of a pre-norm GPT block's decode step; shape/dtype errors; the layer selection; and generation through
it against the model's own blocks.

Tolerances. Layer outputs: |out - ref| <= 2e-5 * (1 + |ref|) against the float64 numpy layer, for the fused kernel
and the composite reference alike (float32 rounding through two LayerNorms, five products of <= 256 terms and a
softmax over <= 40 slots measures <= 2e-6 here; a wrong head, slot or bias is of order 0.1-1). Generation: the
fused and composite layers give the same tokens, and logits within 1e-5 absolute (logits of order 1; only float32
summation orders differ).

Parity sweeps run in PyNative mode (no graph compilation per shape); generation runs in GRAPH_MODE.
"""

from __future__ import annotations

import ctypes
import math

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor

from ms_llm.config import ModelConfig
from ms_llm.kernels._build import build_library
from ms_llm.kernels.decode_layer import (FUSED_MAX_BATCH, DecodeLayerReference, FusedDecodeLayer, fused_unsupported,
                                         make_decode_layer, select_layer_impl)
from ms_llm.models.gpt import GPTLMHeadModel

ON_CPU = ms.get_context("device_target") == "CPU"
TOL = 2e-5


def _erf(x):
    return np.vectorize(math.erf)(x)


ACT = {"relu": lambda v: np.maximum(v, 0.0),
       "gelu": lambda v: 0.5 * v * (1.0 + _erf(v / math.sqrt(2.0))),
       "gelu_new": lambda v: 0.5 * v * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))}


def _layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def numpy_layer(x, weights, k_cache, v_cache, key_mask, slot, nh, eps, scale, activation):
    """float64 decode step of a pre-norm GPT block (HF GPT2Block semantics), caches untouched."""
    f = [None if t is None else t.astype(np.float64) for t in weights]
    ln1_w, ln1_b, wq, bq, wk, bk, wv, bv, wo, bo, ln2_w, ln2_b, w1, b1, w2, b2 = f
    zero = lambda m: np.zeros(m.shape[0])                                   # noqa: E731
    bq, bk, bv, bo, b1, b2 = (zero(m) if b is None else b for m, b in
                              ((wq, bq), (wk, bk), (wv, bv), (wo, bo), (w1, b1), (w2, b2)))
    b, _, h = x.shape
    _, nkv, length, hd = k_cache.shape
    x2 = x.reshape(b, h).astype(np.float64)
    hn = _layer_norm(x2, ln1_w, ln1_b, eps)
    q = (hn @ wq.T + bq).reshape(b, nh, hd)
    k_new = (hn @ wk.T + bk).reshape(b, nkv, hd)
    v_new = (hn @ wv.T + bv).reshape(b, nkv, hd)
    keys, values = k_cache.astype(np.float64).copy(), v_cache.astype(np.float64).copy()
    keys[:, :, slot], values[:, :, slot] = k_new, v_new
    attn = np.zeros((b, nh, hd))
    for i in range(b):
        vis = key_mask[i] > 0.5
        if not vis.any():
            continue
        for head in range(nh):
            g = head // (nh // nkv)
            s = keys[i, g][vis] @ q[i, head] * scale
            p = np.exp(s - s.max())
            attn[i, head] = (p / p.sum()) @ values[i, g][vis]
    x1 = x2 + attn.reshape(b, nh * hd) @ wo.T + bo
    hn2 = _layer_norm(x1, ln2_w, ln2_b, eps)
    y = x1 + ACT[activation](hn2 @ w1.T + b1) @ w2.T + b2
    return y.reshape(b, 1, h), k_new.reshape(b, nkv, 1, hd), v_new.reshape(b, nkv, 1, hd)


def _case(b, h, nh, nkv, f, length, bias=True, seed=0):
    rng = np.random.default_rng(seed)
    hd = h // nh
    r = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)     # noqa: E731
    x = r(b, 1, h) * 3
    weights = [1 + r(h), r(h), r(nh * hd, h), r(nh * hd), r(nkv * hd, h), r(nkv * hd), r(nkv * hd, h), r(nkv * hd),
               r(h, nh * hd), r(h), 1 + r(h), r(h), r(f, h), r(f), r(h, f), r(h)]
    if not bias:
        for i in (3, 5, 7, 9, 13, 15):
            weights[i] = None
    k_cache, v_cache = r(b, nkv, length, hd), r(b, nkv, length, hd)
    slot = length // 2 + 1
    mask = (rng.random((b, length)) < 0.7).astype(np.float32)
    mask[:, slot + 1:] = 0                                                   # nothing beyond the new token
    mask[:, slot] = 1
    if b > 1:
        mask[-1] = 0                                                          # a row that sees nothing (padding)
    k_cache[:, :, slot] = 99.0                                                # the slot of the cache is never read
    v_cache[:, :, slot] = -99.0
    return x, weights, k_cache, v_cache, mask, slot


def _run(cell, x, weights, k_cache, v_cache, mask, slot):
    t = lambda a: None if a is None else Tensor(a)                            # noqa: E731
    out = cell(Tensor(x), *[t(w) for w in weights], Tensor(k_cache), Tensor(v_cache), Tensor(mask),
               Tensor(np.array([slot], np.int32)))
    return [o.asnumpy() for o in out]


CASES = [  # (B, H, heads, kv heads, F, L, bias, activation)
    (1, 64, 4, 4, 256, 40, True, "gelu_new"),
    (3, 64, 4, 2, 128, 33, False, "gelu"),
    (2, 48, 6, 1, 96, 17, True, "relu"),
    (5, 32, 2, 2, 64, 9, True, "gelu_new"),
]


@pytest.mark.skipif(not ON_CPU, reason="the C++ kernel runs on CPU")
@pytest.mark.parametrize("b,h,nh,nkv,f,length,bias,act", CASES)
@pytest.mark.parametrize("impl", ["fused", "composite"])
def test_layer_matches_numpy(pynative, impl, b, h, nh, nkv, f, length, bias, act):
    x, weights, kc, vc, mask, slot = _case(b, h, nh, nkv, f, length, bias)
    eps, scale = 1e-5, 1.0 / math.sqrt(h // nh)
    cell = make_decode_layer(impl, nh, eps, scale, act)
    got = _run(cell, x, weights, kc, vc, mask, slot)
    want = numpy_layer(x, weights, kc, vc, mask, slot, nh, eps, scale, act)
    for name, g, w in zip(("y", "k_new", "v_new"), got, want):
        assert g.shape == w.shape and g.dtype == np.float32, name
        err = np.abs(g - w) / (1 + np.abs(w))
        assert err.max() <= TOL, f"{impl} {name}: max rel err {err.max():.3g}"
    if b > 1:   # the row without visible slots: zero attention, y = x1 + FFN(LN2(x1)) with x1 = x + bo
        assert np.isfinite(got[0]).all()


@pytest.mark.skipif(not ON_CPU, reason="the C++ kernel runs on CPU")
def test_errors_name_the_tensor(pynative):
    x, weights, kc, vc, mask, slot = _case(1, 64, 4, 4, 256, 16)
    cell = FusedDecodeLayer(4, 1e-5, 0.25, "gelu_new")
    bad = list(weights)
    bad[2] = bad[2][:-1]                                                      # wq one row short
    with pytest.raises(ValueError, match=r"wq must be \(64, 64\)"):
        _run(cell, x, bad, kc, vc, mask, slot)
    with pytest.raises(ValueError, match=r"key_mask must be \(1, 16\)"):
        _run(cell, x, weights, kc, vc, mask[:, :-1], slot)
    with pytest.raises(ValueError, match=r"x must be \(B, 1, H\)"):
        _run(cell, np.concatenate([x, x], 1), weights, kc, vc, mask, slot)
    with pytest.raises(ValueError, match="x must be Float32"):
        _run(cell, x.astype(np.float16), weights, kc, vc, mask, slot)
    with pytest.raises(ValueError, match="not a multiple of the caches' kv heads"):
        _run(FusedDecodeLayer(4, 1e-5, 0.25, "gelu_new"), x, weights, kc[:, :3], vc[:, :3], mask, slot)
    with pytest.raises(ValueError, match="activation must be one of relu, gelu, gelu_new"):
        FusedDecodeLayer(4, 1e-5, 0.25, "swiglu")
    with pytest.raises(ValueError, match="unknown decode layer impl"):
        make_decode_layer("flash", 4, 1e-5, 0.25, "gelu")


@pytest.mark.skipif(not ON_CPU, reason="the aot kernel runs on CPU")
def test_kernel_return_codes_refuse_bad_calls(aot_call):
    """The C++ entry point checks the aot call itself (what ops.Custom would hand it if the Python checks were
    bypassed): 0 ok, 1 parameter count, 2 shapes, 3 dtypes, 4 slot outside the cache, 5 params / head counts."""
    fn = ctypes.CDLL(build_library("decode_layer.cc")).DecodeLayer
    x, weights, kc, vc, mask, slot = _case(2, 32, 4, 2, 64, 12, bias=True)
    b, nkv, length, hd = kc.shape
    want = numpy_layer(x, weights, kc, vc, mask, slot, 4, 1e-5, 0.25, "gelu")

    def call(slot=slot, act=1.0, shapes=None, dtypes=None, nparam=None):
        outs = [np.zeros((b, 1, 32), np.float32), np.zeros((b, nkv, 1, hd), np.float32),
                np.zeros((b, nkv, 1, hd), np.float32)]
        arrays = [x, *weights, kc, vc, mask, np.array([slot], np.int32), np.array([1e-5, 0.25, act], np.float32),
                  *outs]
        shp = [a.shape for a in arrays] if shapes is None else shapes
        dts = ["int32" if i == 20 else "float32" for i in range(25)] if dtypes is None else dtypes
        return aot_call(fn, arrays, shp, dts, nparam), outs

    rc, outs = call()
    assert rc == 0
    for g, w in zip(outs, want):
        assert (np.abs(g - w) / (1 + np.abs(w))).max() <= TOL
    assert call(nparam=24)[0] == 1
    shapes = [a.shape for a in [x, *weights, kc, vc, mask]] + [(1,), (3,), (b, 1, 32), (b, nkv, 1, hd),
                                                                (b, nkv, 1, hd)]
    bad = list(shapes)
    bad[15] = (32, 65)                                                        # w2 (H, F) with the wrong F
    assert call(shapes=bad)[0] == 2
    bad = list(shapes)
    bad[19] = (b, length + 1)                                                 # key_mask longer than the caches
    assert call(shapes=bad)[0] == 2
    assert call(dtypes=["float32"] * 25)[0] == 3                              # slot must be int32
    assert call(dtypes=["int32" if i == 20 else "float16" for i in range(25)])[0] == 3
    assert call(slot=length)[0] == 4 and call(slot=-1)[0] == 4
    assert call(act=3.0)[0] == 5 and call(act=0.5)[0] == 5


def _cfg(**kw):
    base = dict(arch="gpt", vocab_size=300, hidden_size=64, num_layers=3, num_heads=4, ffn_hidden_size=256,
                max_position_embeddings=128, dropout=0.0, activation="gelu_new")
    base.update(kw)
    return ModelConfig(**base)


def test_selection():
    gpt = _cfg()
    assert fused_unsupported(gpt) is None
    assert select_layer_impl("auto", gpt, 1, "CPU") == "fused"
    assert select_layer_impl("auto", gpt, FUSED_MAX_BATCH, "CPU") == "fused"
    assert select_layer_impl("auto", gpt, FUSED_MAX_BATCH + 1, "CPU") == "composite"
    assert select_layer_impl("auto", gpt, 1, "Ascend") == "composite"
    assert select_layer_impl("composite", gpt, 1, "CPU") == "composite"
    llama = _cfg(norm="rmsnorm", position_embedding="rotary", activation="swiglu", use_bias=False)
    assert select_layer_impl("auto", llama, 1, "CPU") == "composite"
    for kw, reason in ((dict(norm="rmsnorm"), "model.norm is 'rmsnorm'"),
                       (dict(position_embedding="rotary"), "model.position_embedding is 'rotary'"),
                       (dict(activation="swiglu"), "model.activation is 'swiglu'"),
                       (dict(pre_norm=False), "model.pre_norm is false"),
                       (dict(compute_dtype="float16"), "model.compute_dtype is 'float16'")):
        with pytest.raises(ValueError, match=f"layer_impl='fused' cannot run this model: {reason}"):
            select_layer_impl("fused", _cfg(**kw), 1, "CPU")
    with pytest.raises(ValueError, match="layer_impl must be one of"):
        select_layer_impl("Fused", gpt, 1, "CPU")


@pytest.mark.skipif(not ON_CPU, reason="the C++ kernel runs on CPU")
@pytest.mark.parametrize("kw", [
    dict(),
    dict(num_kv_heads=2, activation="gelu", attention_pattern="alternating_banded", band_width=4, use_bias=False,
         tie_word_embeddings=False),
])
def test_generation_fused_equals_composite(kw):
    model = GPTLMHeadModel(_cfg(**kw))
    model.init_weights(0)
    ids = np.random.default_rng(1).integers(3, 300, (2, 7))
    mask = np.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0                                            # row 1 left-padded
    g = dict(max_new_tokens=10, attention_mask=mask, eos_token_id=None, return_dict_in_generate=True,
             output_logits=True)
    for prefill in ("step", "forward"):
        ref = model.generate(ids, layer_impl="composite", prefill=prefill, **g)
        for impl in ("fused", "auto"):
            out = model.generate(ids, layer_impl=impl, prefill=prefill, **g)
            assert np.array_equal(out.sequences, ref.sequences), (prefill, impl)
            for a, b in zip(out.logits, ref.logits):
                np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    cells = model._ms_llm_generation_steps[(2, 64)]
    assert sorted(cells.decode) == [("gemv", "composite"), ("gemv", "fused")]   # 'auto' at B = 2 on CPU: fused
    assert isinstance(cells.decode[("gemv", "fused")].layer, FusedDecodeLayer)
    assert cells.decode[("gemv", "composite")].layer is None
    assert all(len(step.compile_cache) == 1 for step in cells.decode.values())   # one graph each
    assert len(cells.prefill) == 1                                            # the prefill does not depend on it


def test_reference_is_the_composite():
    assert isinstance(make_decode_layer("composite", 4, 1e-5, 0.25, "gelu"), DecodeLayerReference)
