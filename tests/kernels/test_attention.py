"""Attention core: reference vs a numpy transcription, fused (flash-attention aot kernels) vs reference, forward
and backward, with and without an additive score bias (incl. d bias), plus the kernel builder and the Ascend
argument mapping.

Tolerances: float32 1e-5 (atol and rtol); float16 2e-3 (atol and rtol): the reference runs its two matmuls in
float16 (scores and probabilities rounded to float16), the fused kernel computes in float32 and rounds once.
d bias of a bias shared by the batch sums B per-sequence gradients: same float32 tolerance (measured ~1e-6).
"""

from __future__ import annotations

import ctypes
import os
import stat
from pathlib import Path

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, nn, ops

from ms_llm.kernels import _build
from ms_llm.kernels.attention import (ATTENTION_IMPLS, FusedAttention, ReferenceAttention, _ascend_bias_args,
                                      _ascend_fa_args, make_attention, resolve_attention_impl)

F32_TOL = 1e-5
F16_TOL = 2e-3
ON_ASCEND = ms.get_context("device_target") == "Ascend"


# ----------------------------------------------------------------------------- independent numpy transcription
def np_visible(key_mask, sq, sk, causal, band_width):
    """(B, 1, Sq, Sk) bool, written from the contract: key j visible to query i."""
    b = key_mask.shape[0]
    vis = np.zeros((b, 1, sq, sk), dtype=bool)
    for i in range(sq):
        for j in range(sk):
            ok = True
            if causal:
                ok = j <= i + (sk - sq)
                if band_width > 0:
                    ok = ok and j > i + (sk - sq) - band_width
            vis[:, 0, i, j] = ok & (key_mask[:, j] == 1.0)
    return vis


def np_attention(q, k, v, key_mask, causal=False, band_width=0, scale=None, bias=None):
    """softmax(q k^T * scale [+ bias]) v in float64 over visible keys; rows without a visible key are 0. Also
    returns P."""
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    vis = np_visible(key_mask, q.shape[2], k.shape[2], causal, band_width)
    s = np.einsum("bhid,bhjd->bhij", q, k) * scale                     # (B, nh, Sq, Sk)
    if bias is not None:
        s = s + bias.astype(np.float64)                                 # (B, nh, Sq, Sk), bias broadcast over B
    s = np.where(vis, s, -np.inf)
    row_max = np.max(s, axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    e = np.where(vis, np.exp(s - row_max), 0.0)
    den = e.sum(-1, keepdims=True)
    p = np.divide(e, den, out=np.zeros_like(e), where=den > 0)        # (B, nh, Sq, Sk)
    return np.einsum("bhij,bhjd->bhid", p, v), p


def np_attention_grads(q, k, v, p, dout, scale, bias_batch=None):
    """Analytic softmax-attention backward (float64): dV = P^T dO, dS = P (dO V^T - rowsum(dO O)), ...; with
    ``bias_batch`` (1 or B) also d bias = dS (summed over the batch when 1)."""
    q, k, v, dout = (x.astype(np.float64) for x in (q, k, v, dout))
    out = np.einsum("bhij,bhjd->bhid", p, v)
    dv = np.einsum("bhij,bhid->bhjd", p, dout)
    dp = np.einsum("bhid,bhjd->bhij", dout, v)
    ds = p * (dp - np.sum(dout * out, axis=-1, keepdims=True))
    dq = np.einsum("bhij,bhjd->bhid", ds, k) * scale
    dk = np.einsum("bhij,bhid->bhjd", ds, q) * scale
    if bias_batch is None:
        return dq, dk, dv
    return dq, dk, dv, (ds.sum(0, keepdims=True) if bias_batch == 1 else ds)


def make_inputs(seed, b, nh, sq, sk, hd, dtype=np.float32, pad=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, nh, sq, hd)).astype(dtype)
    k = rng.standard_normal((b, nh, sk, hd)).astype(dtype)
    v = rng.standard_normal((b, nh, sk, hd)).astype(dtype)
    key_mask = np.ones((b, sk), np.float32)
    if pad:
        key_mask[0, sk - pad:] = 0.0                                    # right padding on batch 0
        key_mask[-1, :min(pad, sk - 1)] = 0.0                           # left padding on the last batch
    dout = rng.standard_normal((b, nh, sq, hd)).astype(np.float32)
    return q, k, v, key_mask, dout


class ForwardAndGrads(nn.Cell):
    """(out, dq, dk, dv) of an attention cell for the cotangent ``dout`` (GRAPH_MODE autodiff)."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.grad = ops.GradOperation(get_all=True, sens_param=True)

    def construct(self, q, k, v, key_mask, dout):
        out = self.net(q, k, v, key_mask)
        dq, dk, dv, _ = self.grad(self.net)(q, k, v, key_mask, dout)
        return out, dq, dk, dv


def run(net, q, k, v, key_mask, dout):
    dout = dout.astype(q.dtype)
    res = ForwardAndGrads(net)(Tensor(q), Tensor(k), Tensor(v), Tensor(key_mask), Tensor(dout))
    return [r.asnumpy() for r in res]


# ----------------------------------------------------------------------------- reference vs numpy
REF_CASES = {
    # name: (b, nh, sq, sk, hd, causal, band_width, pad)
    "self": (2, 2, 9, 9, 16, False, 0, 0),
    "self_padding": (2, 2, 9, 9, 16, False, 0, 3),
    "causal_padding": (2, 2, 11, 11, 16, True, 0, 2),
    "causal_band": (2, 2, 13, 13, 16, True, 4, 0),
    "band_padding": (2, 1, 13, 13, 32, True, 3, 2),
    "cross_attention": (2, 2, 5, 12, 16, False, 0, 4),
    "kv_cache_decode": (2, 2, 1, 17, 16, True, 0, 3),
    "kv_cache_decode_band": (2, 2, 1, 17, 16, True, 5, 0),
    "chunked_prefill": (1, 2, 4, 10, 16, True, 0, 0),
}


@pytest.mark.parametrize("name", sorted(REF_CASES))
def test_reference_matches_numpy(name):
    b, nh, sq, sk, hd, causal, band, pad = REF_CASES[name]
    q, k, v, key_mask, _ = make_inputs(1, b, nh, sq, sk, hd, pad=pad)
    expected, _ = np_attention(q, k, v, key_mask, causal, band)
    net = ReferenceAttention(hd, causal=causal, band_width=band)
    out = net(Tensor(q), Tensor(k), Tensor(v), Tensor(key_mask)).asnumpy()
    assert out.shape == (b, nh, sq, hd) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=F32_TOL, atol=F32_TOL)


def test_reference_custom_scale_matches_numpy():
    q, k, v, key_mask, _ = make_inputs(2, 1, 2, 6, 6, 16, pad=1)
    expected, _ = np_attention(q, k, v, key_mask, True, 0, scale=0.37)
    out = ReferenceAttention(16, causal=True, scale=0.37)(Tensor(q), Tensor(k), Tensor(v), Tensor(key_mask))
    np.testing.assert_allclose(out.asnumpy(), expected, rtol=F32_TOL, atol=F32_TOL)


# ----------------------------------------------------------------------------- fused vs reference
FUSED_CASES = {
    # name: (b, nh, sq, sk, hd, causal, band_width, pad); lengths straddle the 64-wide tiles
    "full_odd_hd16": (2, 2, 67, 67, 16, False, 0, 5),
    "causal_hd32": (1, 3, 130, 130, 32, True, 0, 7),
    "band_hd64": (1, 2, 97, 97, 64, True, 20, 3),
    "cross_hd32": (2, 1, 7, 129, 32, False, 0, 9),
    "decode_hd64": (2, 2, 1, 70, 64, True, 0, 4),
    "prefill_chunk_band_hd16": (1, 2, 33, 100, 16, True, 45, 0),
    "more_queries_than_keys": (1, 2, 70, 30, 32, True, 0, 0),
}


@pytest.mark.parametrize("name", sorted(FUSED_CASES))
def test_fused_matches_reference_fp32(name):
    b, nh, sq, sk, hd, causal, band, pad = FUSED_CASES[name]
    q, k, v, key_mask, dout = make_inputs(3, b, nh, sq, sk, hd, pad=pad)
    ref = run(ReferenceAttention(hd, causal=causal, band_width=band), q, k, v, key_mask, dout)
    fused = run(FusedAttention(hd, causal=causal, band_width=band), q, k, v, key_mask, dout)
    for what, r, f in zip(("out", "dq", "dk", "dv"), ref, fused):
        assert f.dtype == np.float32 and f.shape == r.shape, what
        assert np.all(np.isfinite(f)), what
        np.testing.assert_allclose(f, r, rtol=F32_TOL, atol=F32_TOL, err_msg=what)


def test_fused_grads_match_numpy_analytic():
    """Anchors the backward to an independent formula, not only to MindSpore autodiff of the reference."""
    q, k, v, key_mask, dout = make_inputs(4, 2, 2, 45, 71, 32, pad=6)
    scale = 1.0 / np.sqrt(32)
    expected_out, p = np_attention(q, k, v, key_mask, True, 30)
    expected = (expected_out, *np_attention_grads(q, k, v, p, dout, scale))
    fused = run(FusedAttention(32, causal=True, band_width=30), q, k, v, key_mask, dout)
    for what, e, f in zip(("out", "dq", "dk", "dv"), expected, fused):
        np.testing.assert_allclose(f, e, rtol=F32_TOL, atol=F32_TOL, err_msg=what)


@pytest.mark.parametrize("name", ["causal_hd32", "cross_hd32", "band_hd64"])
def test_fused_matches_reference_fp16(name):
    b, nh, sq, sk, hd, causal, band, pad = FUSED_CASES[name]
    q, k, v, key_mask, dout = make_inputs(5, b, nh, sq, sk, hd, dtype=np.float16, pad=pad)
    ref = run(ReferenceAttention(hd, causal=causal, band_width=band), q, k, v, key_mask, dout)
    fused = run(FusedAttention(hd, causal=causal, band_width=band), q, k, v, key_mask, dout)
    for what, r, f in zip(("out", "dq", "dk", "dv"), ref, fused):
        assert f.dtype == np.float16, what
        np.testing.assert_allclose(f.astype(np.float32), r.astype(np.float32), rtol=F16_TOL, atol=F16_TOL,
                                   err_msg=what)


def test_fused_fp16_close_to_float64_truth():
    """Computing in float32 inside, the fused float16 output is within float16 rounding of the exact result."""
    q, k, v, key_mask, _ = make_inputs(6, 1, 2, 50, 50, 32, dtype=np.float16, pad=4)
    expected, _ = np_attention(q, k, v, key_mask, True, 0)
    out = FusedAttention(32, causal=True)(Tensor(q), Tensor(k), Tensor(v), Tensor(key_mask)).asnumpy()
    np.testing.assert_allclose(out.astype(np.float64), expected, rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------- empty rows, errors, factory
@pytest.mark.parametrize("impl", ATTENTION_IMPLS)
def test_rows_without_visible_keys_give_zeros(impl):
    # batch 0: every key padded; queries 0..4 of the causal Sq > Sk case see no key at all
    q, k, v, key_mask, dout = make_inputs(7, 2, 2, 12, 7, 16)
    key_mask[0] = 0.0
    out, dq, dk, dv = run(make_attention(impl, 16, causal=True), q, k, v, key_mask, dout)
    for what, x in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert np.all(np.isfinite(x)), what
    assert np.all(out[0] == 0.0) and np.all(dq[0] == 0.0) and np.all(dk[0] == 0.0) and np.all(dv[0] == 0.0)
    assert np.all(out[1, :, :5] == 0.0) and np.all(dq[1, :, :5] == 0.0)   # j <= i - 5 never holds for i < 5
    expected, _ = np_attention(q, k, v, key_mask, True, 0)
    np.testing.assert_allclose(out, expected, rtol=F32_TOL, atol=F32_TOL)


BAD_SHAPES = {
    "mask_len": ((1, 2, 4, 16), (1, 2, 5, 16), (1, 2, 5, 16), (1, 4), "key_mask (1, 4)"),
    "heads": ((1, 2, 4, 16), (1, 3, 5, 16), (1, 3, 5, 16), (1, 5), "k (1, 3, 5, 16)"),
    "head_dim": ((1, 2, 4, 8), (1, 2, 5, 8), (1, 2, 5, 8), (1, 5), "q (1, 2, 4, 8)"),
    "rank": ((2, 4, 16), (2, 5, 16), (2, 5, 16), (1, 5), "q (2, 4, 16)"),
    "v_len": ((1, 2, 4, 16), (1, 2, 5, 16), (1, 2, 6, 16), (1, 5), "v (1, 2, 6, 16)"),
}


@pytest.mark.parametrize("impl", ATTENTION_IMPLS)
@pytest.mark.parametrize("case", sorted(BAD_SHAPES))
def test_bad_shapes_raise_value_error_naming_shapes(impl, case):
    q_shape, k_shape, v_shape, m_shape, named = BAD_SHAPES[case]
    net = make_attention(impl, 16)
    args = [Tensor(np.zeros(s, np.float32)) for s in (q_shape, k_shape, v_shape, m_shape)]
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace(")", r"\)")):
        net(*args)


@pytest.mark.parametrize("impl", ATTENTION_IMPLS)
def test_mixed_dtypes_raise(impl):
    q = Tensor(np.zeros((1, 1, 3, 16), np.float32))
    k = Tensor(np.zeros((1, 1, 3, 16), np.float16))
    with pytest.raises(ValueError, match="dtype"):
        make_attention(impl, 16)(q, k, k, Tensor(np.ones((1, 3), np.float32)))


def test_bad_config_raises():
    with pytest.raises(ValueError, match="band_width=4 needs causal=True"):
        ReferenceAttention(16, band_width=4)
    with pytest.raises(ValueError, match="head_dim"):
        FusedAttention(0)
    with pytest.raises(ValueError, match="scale"):
        make_attention("reference", 16, scale=-1.0)
    with pytest.raises(ValueError, match="valid: reference, fused"):
        make_attention("flash", 16)


def test_make_attention_returns_the_named_cell():
    assert isinstance(make_attention("reference", 16, causal=True), ReferenceAttention)
    fused = make_attention("fused", 32, causal=True, band_width=8, scale=0.5)
    assert isinstance(fused, FusedAttention) and fused.scale == 0.5 and fused.band_width == 8


def test_auto_is_fused_on_cpu_and_reference_elsewhere(monkeypatch):
    assert resolve_attention_impl("reference") == "reference" and resolve_attention_impl("fused") == "fused"
    for device, impl in (("CPU", "fused"), ("Ascend", "reference"), ("GPU", "reference")):
        monkeypatch.setattr(ms, "get_context", lambda key, d=device: d)
        assert resolve_attention_impl("auto") == impl, device


# ----------------------------------------------------------------------------- Ascend argument mapping
def cann_mode0_band(sq, sk, pre_tokens, next_tokens):
    """CANN FlashAttentionScore sparse_mode 0: computes i - pre_tokens <= j <= i + next_tokens (top-left origin)."""
    i = np.arange(sq)[:, None]
    j = np.arange(sk)[None, :]
    return (i - j <= pre_tokens) & (j - i <= next_tokens)


def cann_args_allowed(sq, sk, pre, nxt):
    """The documented limits on pre_tokens / next_tokens (mindspore.ops.flash_attention_score)."""
    if pre < 0 and nxt < 0:
        return False
    if pre < 0 and (nxt < -pre or -pre >= sq):
        return False
    if nxt < 0 and (-nxt > pre or -nxt >= sk):
        return False
    return True


@pytest.mark.parametrize("causal,band", [(False, 0), (True, 0), (True, 1), (True, 4), (True, 40)])
@pytest.mark.parametrize("sq,sk", [(16, 16), (1, 33), (5, 33), (33, 20), (20, 33), (64, 64)])
def test_ascend_fa_args_describe_our_mask(causal, band, sq, sk):
    sparse_mode, pre, nxt = _ascend_fa_args(causal, band, sq, sk)
    assert sparse_mode == 0                       # explicit (B, 1, Sq, Sk) mask carries the key padding
    assert cann_args_allowed(sq, sk, pre, nxt)
    ours = np_visible(np.ones((1, sk), np.float32), sq, sk, causal, band)[0, 0]
    theirs = cann_mode0_band(sq, sk, pre, nxt)
    assert np.all(theirs[ours]), "the computed band must contain every visible key"
    if (pre, nxt) != (2147483647, 2147483647) or not causal:
        np.testing.assert_array_equal(theirs, ours)
    else:  # fell back to computing everything: only when the exact band is outside the op's limits
        offset = sk - sq
        exact_pre = 2147483647 if band == 0 else band - 1 - offset
        assert not cann_args_allowed(sq, sk, exact_pre, offset)


@pytest.mark.ascend
@pytest.mark.skipif(not ON_ASCEND, reason="ops.flash_attention_score runs only on an Ascend NPU")
@pytest.mark.parametrize("causal,band,pad", [(False, 0, 3), (True, 0, 0), (True, 16, 2)])
def test_ascend_fused_matches_reference(causal, band, pad):
    q, k, v, key_mask, dout = make_inputs(8, 2, 4, 96, 96, 64, dtype=np.float16, pad=pad)
    ref = run(ReferenceAttention(64, causal=causal, band_width=band), q, k, v, key_mask, dout)
    fused = run(FusedAttention(64, causal=causal, band_width=band), q, k, v, key_mask, dout)
    for what, r, f in zip(("out", "dq", "dk", "dv"), ref, fused):
        np.testing.assert_allclose(f.astype(np.float32), r.astype(np.float32), rtol=F16_TOL, atol=F16_TOL,
                                   err_msg=what)


# ----------------------------------------------------------------------------- additive score bias
class ForwardAndGradsBiased(nn.Cell):
    """(out, dq, dk, dv, dbias) of a ``has_bias`` attention cell for the cotangent ``dout``."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.grad = ops.GradOperation(get_all=True, sens_param=True)

    def construct(self, q, k, v, key_mask, bias, dout):
        out = self.net(q, k, v, key_mask, bias)
        dq, dk, dv, _, dbias = self.grad(self.net)(q, k, v, key_mask, bias, dout)
        return out, dq, dk, dv, dbias


def make_bias(seed, bias_batch, nh, sq, sk):
    return np.random.default_rng(seed).normal(0.0, 1.5, (bias_batch, nh, sq, sk)).astype(np.float32)


def run_biased(net, q, k, v, key_mask, bias, dout):
    dout = dout.astype(q.dtype)
    res = ForwardAndGradsBiased(net)(Tensor(q), Tensor(k), Tensor(v), Tensor(key_mask), Tensor(bias), Tensor(dout))
    return [r.asnumpy() for r in res]


BIAS_CASES = {
    # name: (b, nh, sq, sk, hd, causal, band_width, pad, bias_batch); lengths straddle the 64-wide tiles
    "shared_causal_padding": (2, 2, 67, 67, 16, True, 0, 5, 1),
    "per_batch_full_padding": (2, 2, 70, 130, 32, False, 0, 7, 2),
    "shared_band_3_batches": (3, 2, 97, 97, 32, True, 20, 3, 1),
    "per_batch_causal_cross": (2, 1, 7, 129, 16, True, 0, 9, 2),
}
BIAS_NAMES = ("out", "dq", "dk", "dv", "dbias")


def test_reference_with_bias_matches_numpy():
    """The biased reference (MindSpore autodiff) against the float64 formula, incl. d bias summed over B."""
    b, nh, sq, sk, hd = 2, 2, 9, 11, 16
    q, k, v, key_mask, dout = make_inputs(11, b, nh, sq, sk, hd, pad=3)
    bias = make_bias(12, 1, nh, sq, sk)
    expected_out, p = np_attention(q, k, v, key_mask, True, 0, scale=0.4, bias=bias)
    expected = (expected_out, *np_attention_grads(q, k, v, p, dout, 0.4, bias_batch=1))
    got = run_biased(ReferenceAttention(hd, causal=True, scale=0.4, has_bias=True), q, k, v, key_mask, bias, dout)
    assert got[4].shape == bias.shape and got[4].dtype == np.float32
    for what, e, g in zip(BIAS_NAMES, expected, got):
        np.testing.assert_allclose(g, e, rtol=F32_TOL, atol=F32_TOL, err_msg=what)


@pytest.mark.parametrize("name", sorted(BIAS_CASES))
def test_fused_with_bias_matches_reference_fp32(name):
    b, nh, sq, sk, hd, causal, band, pad, bb = BIAS_CASES[name]
    q, k, v, key_mask, dout = make_inputs(13, b, nh, sq, sk, hd, pad=pad)
    bias = make_bias(14, bb, nh, sq, sk)
    kw = dict(causal=causal, band_width=band, has_bias=True)
    ref = run_biased(ReferenceAttention(hd, **kw), q, k, v, key_mask, bias, dout)
    fused = run_biased(FusedAttention(hd, **kw), q, k, v, key_mask, bias, dout)
    assert fused[4].shape == (bb, nh, sq, sk) and fused[4].dtype == np.float32
    assert np.abs(fused[4]).max() > 1e-3                                 # a real gradient, not zeros
    for what, r, f in zip(BIAS_NAMES, ref, fused):
        assert f.shape == r.shape and np.all(np.isfinite(f)), what
        np.testing.assert_allclose(f, r, rtol=F32_TOL, atol=F32_TOL, err_msg=what)


def test_fused_with_bias_matches_numpy_analytic():
    """Anchors the biased fused backward (d bias of a batch-shared bias included) to the float64 formula."""
    q, k, v, key_mask, dout = make_inputs(15, 3, 2, 45, 71, 32, pad=6)
    bias = make_bias(16, 1, 2, 45, 71)
    expected_out, p = np_attention(q, k, v, key_mask, True, 30, scale=0.25, bias=bias)
    expected = (expected_out, *np_attention_grads(q, k, v, p, dout, 0.25, bias_batch=1))
    got = run_biased(FusedAttention(32, causal=True, band_width=30, scale=0.25, has_bias=True), q, k, v, key_mask,
                     bias, dout)
    for what, e, g in zip(BIAS_NAMES, expected, got):
        np.testing.assert_allclose(g, e, rtol=F32_TOL, atol=F32_TOL, err_msg=what)


def test_fused_with_bias_matches_reference_fp16():
    """float16 q, k, v with a float32 bias: out/dq/dk/dv in float16, d bias in float32."""
    b, nh, sq, sk, hd, causal, band, pad, bb = BIAS_CASES["per_batch_full_padding"]
    q, k, v, key_mask, dout = make_inputs(17, b, nh, sq, sk, hd, dtype=np.float16, pad=pad)
    bias = make_bias(18, bb, nh, sq, sk)
    kw = dict(causal=causal, band_width=band, has_bias=True)
    ref = run_biased(ReferenceAttention(hd, **kw), q, k, v, key_mask, bias, dout)
    fused = run_biased(FusedAttention(hd, **kw), q, k, v, key_mask, bias, dout)
    for what, r, f in zip(BIAS_NAMES, ref, fused):
        assert f.dtype == (np.float32 if what == "dbias" else np.float16), what
        np.testing.assert_allclose(f.astype(np.float32), r.astype(np.float32), rtol=F16_TOL, atol=F16_TOL,
                                   err_msg=what)


@pytest.mark.parametrize("impl", ATTENTION_IMPLS)
def test_bias_rows_without_visible_keys_give_zeros(impl):
    """Batch 0 fully padded and causal Sq > Sk: empty rows output zeros and get zero d bias (not NaN)."""
    q, k, v, key_mask, dout = make_inputs(19, 2, 2, 12, 7, 16)
    key_mask[0] = 0.0
    bias = make_bias(20, 2, 2, 12, 7)
    out, dq, dk, dv, dbias = run_biased(make_attention(impl, 16, causal=True, has_bias=True), q, k, v, key_mask,
                                        bias, dout)
    assert all(np.all(np.isfinite(x)) for x in (out, dq, dk, dv, dbias))
    assert np.all(out[0] == 0.0) and np.all(dbias[0] == 0.0) and np.all(dq[0] == 0.0)
    assert np.all(dbias[1, :, :5] == 0.0)                                 # queries 0..4 see no key
    expected_out, p = np_attention(q, k, v, key_mask, True, 0, bias=bias)
    expected_dbias = np_attention_grads(q, k, v, p, dout, 0.25, bias_batch=2)[3]
    np.testing.assert_allclose(out, expected_out, rtol=F32_TOL, atol=F32_TOL)
    np.testing.assert_allclose(dbias, expected_dbias, rtol=F32_TOL, atol=F32_TOL)


class BiasedPlusUnbiased(nn.Cell):
    """A biased and an unbiased core in one graph (Switch: biased self-, unbiased cross-attention)."""

    def __init__(self, impl):
        super().__init__()
        self.biased = make_attention(impl, 16, causal=True, has_bias=True)
        self.plain = make_attention(impl, 16)

    def construct(self, q, k, v, key_mask, bias):
        return self.biased(q, k, v, key_mask, bias) * 2.0 + self.plain(q, k, v, key_mask)


def test_biased_and_unbiased_fused_cores_in_one_graph():
    """Regression: both CPU Custom ops in one differentiated graph (they must not share an aot symbol)."""
    q, k, v, key_mask, dout = make_inputs(25, 2, 2, 10, 10, 16, pad=2)
    bias = make_bias(26, 1, 2, 10, 10)
    ref = run_biased(BiasedPlusUnbiased("reference"), q, k, v, key_mask, bias, dout)
    fused = run_biased(BiasedPlusUnbiased("fused"), q, k, v, key_mask, bias, dout)
    for what, r, f in zip(BIAS_NAMES, ref, fused):
        np.testing.assert_allclose(f, r, rtol=F32_TOL, atol=F32_TOL, err_msg=what)


BAD_BIAS = {
    # q (2, 2, 4, 16), k/v (2, 2, 5, 16): a valid bias is (1 or 2, 2, 4, 5) float32
    "sk": ((1, 2, 4, 6), np.float32, "bias (1, 2, 4, 6)"),
    "heads": ((2, 1, 4, 5), np.float32, "bias (2, 1, 4, 5)"),
    "batch": ((3, 2, 4, 5), np.float32, "bias (3, 2, 4, 5)"),
    "rank": ((2, 4, 5), np.float32, "bias (2, 4, 5)"),
    "dtype": ((1, 2, 4, 5), np.float16, "float32.*bias (1, 2, 4, 5)"),
}


@pytest.mark.parametrize("impl", ATTENTION_IMPLS)
@pytest.mark.parametrize("case", sorted(BAD_BIAS))
def test_bad_bias_raises_value_error_naming_shape(impl, case):
    shape, dtype, named = BAD_BIAS[case]
    net = make_attention(impl, 16, has_bias=True)
    args = [Tensor(np.zeros(s, np.float32)) for s in ((2, 2, 4, 16), (2, 2, 5, 16), (2, 2, 5, 16), (2, 5))]
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace(")", r"\)")):
        net(*args, Tensor(np.zeros(shape, dtype)))


@pytest.mark.parametrize("impl", ATTENTION_IMPLS)
def test_bias_arity_must_match_has_bias(impl):
    q = Tensor(np.zeros((1, 2, 3, 16), np.float32))
    mask = Tensor(np.ones((1, 3), np.float32))
    bias = Tensor(np.zeros((1, 2, 3, 3), np.float32))
    with pytest.raises(ValueError, match="without has_bias=True"):
        make_attention(impl, 16)(q, q, q, mask, bias)
    with pytest.raises(ValueError, match=r"has_bias=True: call it with \(q, k, v, key_mask, bias\)"):
        make_attention(impl, 16, has_bias=True)(q, q, q, mask)
    with pytest.raises(ValueError, match="has_bias must be a bool"):
        make_attention(impl, 16, has_bias=1)


@pytest.mark.parametrize("bias_batch", [1, 2])
def test_ascend_bias_args_agree_with_both_documented_pse_formulas(bias_batch):
    """MindSpore documents flash_attention_score as softmax(scale * qk^T + pse), CANN's FlashAttentionScore as
    softmax(scale * (pse + qk^T)); with the arguments we pass, both equal q k^T * scale + bias (float16 inputs to
    the op, so 2e-3)."""
    q, k, _, _, _ = make_inputs(21, 2, 2, 5, 6, 16)
    bias = make_bias(22, bias_batch, 2, 5, 6)
    query, pse, scalar = _ascend_bias_args(Tensor(q), 0.25, Tensor(bias))
    assert query.dtype == ms.float16 and pse.dtype == ms.float16 and pse.shape == bias.shape and scalar == 1.0
    qk = np.einsum("bhid,bhjd->bhij", query.asnumpy().astype(np.float64), k.astype(np.float64))
    pse = pse.asnumpy().astype(np.float64)
    want = np.einsum("bhid,bhjd->bhij", q.astype(np.float64), k.astype(np.float64)) * 0.25 + bias
    np.testing.assert_allclose(scalar * qk + pse, want, rtol=F16_TOL, atol=F16_TOL)      # MindSpore's reading
    np.testing.assert_allclose(scalar * (pse + qk), want, rtol=F16_TOL, atol=F16_TOL)    # CANN's reading
    query, pse, scalar = _ascend_bias_args(Tensor(q), 0.25, None)
    assert pse is None and scalar == 0.25 and query.dtype == ms.float16


@pytest.mark.ascend
@pytest.mark.skipif(not ON_ASCEND, reason="ops.flash_attention_score runs only on an Ascend NPU")
@pytest.mark.parametrize("causal,pad,bias_batch", [(False, 3, 1), (True, 0, 2), (True, 2, 1)])
def test_ascend_fused_with_bias_matches_reference(causal, pad, bias_batch):
    q, k, v, key_mask, dout = make_inputs(23, 2, 4, 96, 96, 64, dtype=np.float16, pad=pad)
    bias = make_bias(24, bias_batch, 4, 96, 96)
    ref = run_biased(ReferenceAttention(64, causal=causal, has_bias=True), q, k, v, key_mask, bias, dout)
    fused = run_biased(FusedAttention(64, causal=causal, has_bias=True), q, k, v, key_mask, bias, dout)
    for what, r, f in zip(BIAS_NAMES, ref, fused):
        assert f.shape == r.shape, what
        np.testing.assert_allclose(f.astype(np.float32), r.astype(np.float32), rtol=F16_TOL, atol=F16_TOL,
                                   err_msg=what)


# ----------------------------------------------------------------------------- the builder and the C ABI
def call_aot(lib, name, arrays, dtypes):
    """Calls an aot kernel the way MindSpore does: (nparam, params, ndims, shapes, dtypes, stream, extra)."""
    n = len(arrays)
    params = (ctypes.c_void_p * n)(*[a.ctypes.data for a in arrays])
    ndims = (ctypes.c_int * n)(*[a.ndim for a in arrays])
    dims = [(ctypes.c_int64 * max(a.ndim, 1))(*a.shape) for a in arrays]
    shapes = (ctypes.POINTER(ctypes.c_int64) * n)(*[ctypes.cast(d, ctypes.POINTER(ctypes.c_int64)) for d in dims])
    names = (ctypes.c_char_p * n)(*[d.encode() for d in dtypes])
    return getattr(lib, name)(n, params, ndims, shapes, names, None, None)


def test_generic_isa_build_matches_numpy(tmp_path):
    """The portable (no AVX) library, called through the aot ABI, forward and backward."""
    path = _build.build_library("flash_attention.cc", isa="generic", cache_root=tmp_path)
    assert Path(path).is_file() and not list(Path(path).parent.glob(".flash_attention-*"))
    assert _build.build_library("flash_attention.cc", isa="generic", cache_root=tmp_path) == path  # cached
    lib = ctypes.CDLL(path)
    q, k, v, key_mask, dout = make_inputs(9, 2, 2, 70, 75, 24, pad=5)
    scale = 0.3
    params = np.array([scale, 1.0, 33.0, 0.0], np.float32)              # causal, band_width 33, BNSD
    out = np.zeros_like(q)
    lse = np.zeros(q.shape[:3], np.float32)
    f32 = ["float32"] * 7
    assert call_aot(lib, "FlashAttentionFwd", [q, k, v, key_mask, params, out, lse], f32) == 0
    expected, p = np_attention(q, k, v, key_mask, True, 33, scale=scale)
    np.testing.assert_allclose(out, expected, rtol=F32_TOL, atol=F32_TOL)
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    args = [q, k, v, key_mask, params, out, dout, lse, dq, dk, dv]
    assert call_aot(lib, "FlashAttentionBwd", args, ["float32"] * 11) == 0
    for what, e, g in zip(("dq", "dk", "dv"), np_attention_grads(q, k, v, p, dout, scale), (dq, dk, dv)):
        np.testing.assert_allclose(g, e, rtol=F32_TOL, atol=F32_TOL, err_msg=what)
    # a contract violation (band without causal) is refused with a nonzero status, not computed
    bad = np.array([scale, 0.0, 3.0, 0.0], np.float32)
    assert call_aot(lib, "FlashAttentionFwd", [q, k, v, key_mask, bad, out, lse], f32) != 0
    for bad in (np.array([scale, 1.0, 33.0], np.float32), np.array([scale, 1.0, 33.0, 2.0], np.float32)):
        assert call_aot(lib, "FlashAttentionFwd", [q, k, v, key_mask, bad, out, lse], f32) != 0  # no/bad layout
    # with a bias shared by the batch (the Bias entry points); dbias starts as NaN: every element must be written
    bias = make_bias(10, 1, 2, 70, 75)
    assert call_aot(lib, "FlashAttentionBiasFwd", [q, k, v, key_mask, params, bias, out, lse], f32 + ["float32"]) == 0
    expected, p = np_attention(q, k, v, key_mask, True, 33, scale=scale, bias=bias)
    np.testing.assert_allclose(out, expected, rtol=F32_TOL, atol=F32_TOL)
    dbias = np.full_like(bias, np.nan)
    args = [q, k, v, key_mask, params, bias, out, dout, lse, dq, dk, dv, dbias]
    assert call_aot(lib, "FlashAttentionBiasBwd", args, ["float32"] * 13) == 0
    grads = np_attention_grads(q, k, v, p, dout, scale, bias_batch=1)
    for what, e, g in zip(("dq", "dk", "dv", "dbias"), grads, (dq, dk, dv, dbias)):
        np.testing.assert_allclose(g, e, rtol=F32_TOL, atol=F32_TOL, err_msg=what)
    bias2 = make_bias(27, 2, 2, 70, 75)                                 # one bias per sequence
    assert call_aot(lib, "FlashAttentionBiasFwd", [q, k, v, key_mask, params, bias2, out, lse], f32 + ["float32"]) == 0
    _, p2 = np_attention(q, k, v, key_mask, True, 33, scale=scale, bias=bias2)
    dbias2 = np.full_like(bias2, np.nan)
    args = [q, k, v, key_mask, params, bias2, out, dout, lse, dq, dk, dv, dbias2]
    assert call_aot(lib, "FlashAttentionBiasBwd", args, ["float32"] * 13) == 0
    expected_dbias2 = np_attention_grads(q, k, v, p2, dout, scale, bias_batch=2)[3]
    np.testing.assert_allclose(dbias2, expected_dbias2, rtol=F32_TOL, atol=F32_TOL, err_msg="dbias per sequence")
    short = np.zeros((1, 2, 70, 74), np.float32)                       # Sk - 1 keys: refused
    assert call_aot(lib, "FlashAttentionBiasFwd", [q, k, v, key_mask, params, short, out, lse], f32 + ["float32"]) != 0
    assert call_aot(lib, "FlashAttentionFwd", [q, k, v, key_mask, params, bias, out, lse], f32 + ["float32"]) != 0


def test_aot_bsnd_layout_matches_numpy():
    """The kernels with params[3] = 1 read q/k/v/dout and write out/dq/dk/dv as (B, S, H, D); lse stays (B, H, Sq).
    Outputs start as NaN: every element must be written."""
    lib = ctypes.CDLL(_build.build_library("flash_attention.cc"))
    q, k, v, key_mask, dout = make_inputs(21, 2, 3, 70, 75, 24, pad=5)
    bsnd = [np.ascontiguousarray(x.transpose(0, 2, 1, 3)) for x in (q, k, v, dout)]
    params = np.array([0.3, 1.0, 33.0, 1.0], np.float32)
    out = np.full(bsnd[0].shape, np.nan, np.float32)
    lse = np.full((2, 3, 70), np.nan, np.float32)
    assert call_aot(lib, "FlashAttentionFwd", [*bsnd[:3], key_mask, params, out, lse], ["float32"] * 7) == 0
    expected, p = np_attention(q, k, v, key_mask, True, 33, scale=0.3)
    np.testing.assert_allclose(out, expected.transpose(0, 2, 1, 3), rtol=F32_TOL, atol=F32_TOL)
    grads = [np.full(x.shape, np.nan, np.float32) for x in bsnd[:3]]
    args = [*bsnd[:3], key_mask, params, out, bsnd[3], lse, *grads]
    assert call_aot(lib, "FlashAttentionBwd", args, ["float32"] * 11) == 0
    for what, e, g in zip(("dq", "dk", "dv"), np_attention_grads(q, k, v, p, dout, 0.3), grads):
        np.testing.assert_allclose(g, e.transpose(0, 2, 1, 3), rtol=F32_TOL, atol=F32_TOL, err_msg=what)
    # a k whose head count differs from q's (as BSND reads it) is refused
    k_bad = np.zeros((2, 75, 2, 24), np.float32)
    assert call_aot(lib, "FlashAttentionFwd", [bsnd[0], k_bad, k_bad, key_mask, params, out, lse],
                    ["float32"] * 7) != 0


def bsnd(x):
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3))


@pytest.mark.parametrize("impl", ATTENTION_IMPLS)
@pytest.mark.parametrize("name", ["causal_hd32", "cross_hd32", "band_hd64", "decode_hd64"])
def test_bsnd_layout_matches_bnsd(impl, name):
    """A core built with layout='BSND' on (B, S, nh, hd) inputs gives the BNSD reference's out/dq/dk/dv with the
    same axes swapped (fused: forward and backward kernels read and write in place)."""
    b, nh, sq, sk, hd, causal, band, pad = FUSED_CASES[name]
    q, k, v, key_mask, dout = make_inputs(22, b, nh, sq, sk, hd, pad=pad)
    ref = run(ReferenceAttention(hd, causal=causal, band_width=band), q, k, v, key_mask, dout)
    got = run(make_attention(impl, hd, causal=causal, band_width=band, layout="BSND"), bsnd(q), bsnd(k), bsnd(v),
              key_mask, bsnd(dout))
    for what, r, g in zip(("out", "dq", "dk", "dv"), ref, got):
        assert g.shape == bsnd(r).shape, what
        np.testing.assert_allclose(g, bsnd(r), rtol=F32_TOL, atol=F32_TOL, err_msg=what)


@pytest.mark.parametrize("impl", ATTENTION_IMPLS)
def test_bsnd_layout_with_bias_matches_bnsd(impl):
    b, nh, sq, sk, hd, causal, band, pad, bb = BIAS_CASES["shared_band_3_batches"]
    q, k, v, key_mask, dout = make_inputs(23, b, nh, sq, sk, hd, pad=pad)
    bias = make_bias(24, bb, nh, sq, sk)
    kw = dict(causal=causal, band_width=band, has_bias=True)
    ref = run_biased(ReferenceAttention(hd, **kw), q, k, v, key_mask, bias, dout)
    got = run_biased(make_attention(impl, hd, layout="BSND", **kw), bsnd(q), bsnd(k), bsnd(v), key_mask, bias,
                     bsnd(dout))
    for what, r, g in zip(BIAS_NAMES, ref, got):
        r = r if what == "dbias" else bsnd(r)
        np.testing.assert_allclose(g, r, rtol=F32_TOL, atol=F32_TOL, err_msg=what)


def test_bsnd_fused_fp16_matches_reference():
    b, nh, sq, sk, hd, causal, band, pad = FUSED_CASES["causal_hd32"]
    q, k, v, key_mask, dout = make_inputs(25, b, nh, sq, sk, hd, dtype=np.float16, pad=pad)
    ref = run(ReferenceAttention(hd, causal=causal), q, k, v, key_mask, dout)
    got = run(FusedAttention(hd, causal=causal, layout="BSND"), bsnd(q), bsnd(k), bsnd(v), key_mask, bsnd(dout))
    for what, r, g in zip(("out", "dq", "dk", "dv"), ref, got):
        assert g.dtype == np.float16, what
        np.testing.assert_allclose(g.astype(np.float32), bsnd(r).astype(np.float32), rtol=F16_TOL, atol=F16_TOL,
                                   err_msg=what)


@pytest.mark.parametrize("impl", ATTENTION_IMPLS)
def test_bsnd_bad_shapes_name_the_layout(impl):
    net = make_attention(impl, 16, layout="BSND")
    q = Tensor(np.zeros((2, 9, 3, 16), np.float32))                   # (B, S, nh, hd)
    k = Tensor(np.zeros((2, 9, 2, 16), np.float32))                   # 2 heads against q's 3
    with pytest.raises(ValueError, match=r"layout BSND: q \(2, 9, 3, 16\), k \(2, 9, 2, 16\)"):
        net(q, k, k, Tensor(np.ones((2, 9), np.float32)))
    with pytest.raises(ValueError, match="layout must be one of BNSD, BSND, got 'BHSD'"):
        make_attention(impl, 16, layout="BHSD")


def test_build_failure_reports_compiler_output(tmp_path):
    fake = tmp_path / "fake-g++"
    fake.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'fake 1.0'; exit 0; fi\n"
                    "echo 'flash_attention.cc:1: error: boom' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(_build.KernelBuildError, match="(?s)exit 1.*command: .*fake-g\\+\\+.*error: boom"):
        _build.build_library("flash_attention.cc", isa="generic", cache_root=tmp_path / "cache", cxx=str(fake))
    leftovers = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert leftovers == []                        # the temporary output was removed


def test_missing_compiler_is_a_clear_error(tmp_path):
    with pytest.raises(_build.KernelBuildError, match="not found on PATH"):
        _build.build_library("flash_attention.cc", cache_root=tmp_path, cxx="no-such-compiler-xyz")


def test_library_path_depends_on_isa_and_source(tmp_path):
    generic = _build.library_path("flash_attention.cc", isa="generic", cache_root=tmp_path)
    avx2 = _build.library_path("flash_attention.cc", isa="avx2", cache_root=tmp_path)
    assert generic != avx2 and generic.name == avx2.name == "flash_attention.so"
    assert _build.resolve_isa("generic") == "generic"
    assert _build.resolve_isa("auto") in _build.ISA_FLAGS
    with pytest.raises(ValueError, match="isa must be one of"):
        _build.resolve_isa("sse9")
    assert os.path.isabs(str(_build.default_cache_root()))
