"""Attention core: reference vs a numpy transcription, fused (flash-attention aot kernels) vs reference, forward
and backward, plus the kernel builder and the Ascend argument mapping.

Tolerances: float32 1e-5 (atol and rtol); float16 2e-3 (atol and rtol): the reference runs its two matmuls in
float16 (scores and probabilities rounded to float16), the fused kernel computes in float32 and rounds once.
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
from ms_llm.kernels.attention import (ATTENTION_IMPLS, FusedAttention, ReferenceAttention, _ascend_fa_args,
                                      make_attention)

F32_TOL = 1e-5
F16_TOL = 2e-3
ON_ASCEND = ms.get_context("device_target") == "Ascend"


@pytest.fixture(autouse=True, scope="module")
def graph_mode():
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=previous)


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


def np_attention(q, k, v, key_mask, causal=False, band_width=0, scale=None):
    """softmax(q k^T * scale) v in float64 over visible keys; rows without a visible key are 0. Also returns P."""
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    vis = np_visible(key_mask, q.shape[2], k.shape[2], causal, band_width)
    s = np.einsum("bhid,bhjd->bhij", q, k) * scale                     # (B, nh, Sq, Sk)
    s = np.where(vis, s, -np.inf)
    row_max = np.max(s, axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    e = np.where(vis, np.exp(s - row_max), 0.0)
    den = e.sum(-1, keepdims=True)
    p = np.divide(e, den, out=np.zeros_like(e), where=den > 0)        # (B, nh, Sq, Sk)
    return np.einsum("bhij,bhjd->bhid", p, v), p


def np_attention_grads(q, k, v, p, dout, scale):
    """Analytic softmax-attention backward (float64): dV = P^T dO, dS = P (dO V^T - rowsum(dO O)), ..."""
    q, k, v, dout = (x.astype(np.float64) for x in (q, k, v, dout))
    out = np.einsum("bhij,bhjd->bhid", p, v)
    dv = np.einsum("bhij,bhid->bhjd", p, dout)
    dp = np.einsum("bhid,bhjd->bhij", dout, v)
    ds = p * (dp - np.sum(dout * out, axis=-1, keepdims=True))
    dq = np.einsum("bhij,bhjd->bhid", ds, k) * scale
    dk = np.einsum("bhij,bhid->bhjd", ds, q) * scale
    return dq, dk, dv


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
    params = np.array([scale, 1.0, 33.0], np.float32)                   # causal, band_width 33
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
    bad = np.array([scale, 0.0, 3.0], np.float32)
    assert call_aot(lib, "FlashAttentionFwd", [q, k, v, key_mask, bad, out, lse], f32) != 0


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
