"""The output-head GEMV (C++ aot kernel on CPU): y (B, V) = x (B, H) @ w (V, H)^T against float64 numpy and MindSpore's
MatMul; its bprop; shape/dtype errors (Python side and the kernel's own return codes); the head selection; and
generation through it (tied and untied heads) against the MatMul head.

Tolerances. float32: |y - ref| <= 1e-6 * (|x| @ |w|^T), ref the float64 product (the bound scales with the sum of
absolute products, the natural scale of summation error; float32 rounding of H <= 768 products summed in 16-lane
accumulators measures <= 1.5e-7 of it, a wrong or missing term is of order 1). float16: the float64 product of the
float16 inputs, rounded once to float16 by the kernel: |y - ref| <= 2^-11 |ref| (half an ulp) + 1e-6 * bound
+ 2^-25 (half the smallest subnormal). Gradients (a MatMul bprop): 1e-5 relative to the same bound.
Generation: 'gemv' and 'matmul' heads produce the same tokens and logits within 1e-5 absolute (logits of order 1-10;
only the summation order of the head differs).

The shape sweeps run in PyNative mode (no graph compilation per shape); one parity case, the gradient and
generation run in GRAPH_MODE.
"""

from __future__ import annotations

import ctypes
import dataclasses

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, nn, ops

from ms_llm.config import ModelConfig
from ms_llm.kernels._build import build_library
from ms_llm.kernels.gemv import GEMV_MAX_BATCH, Gemv, MatMulNT, make_gemv, select_head_impl
from ms_llm.models.gpt import GPTLMHeadModel

ON_CPU = ms.get_context("device_target") == "CPU"
F32_TOL = 1e-6


def _inputs(b, h, v, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((b, h)) * 0.5).astype(dtype)
    w = (rng.standard_normal((v, h)) * 0.5).astype(dtype)
    return x, w


def _reference(x, w):
    """(float64 product, float64 bound |x| @ |w|^T) of the given (possibly float16) values."""
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    return x64 @ w64.T, np.abs(x64) @ np.abs(w64).T


def _check_f32(y, x, w):
    ref, bound = _reference(x, w)
    assert y.shape == ref.shape and y.dtype == np.float32
    err = np.abs(y.astype(np.float64) - ref)
    assert (err <= F32_TOL * bound).all(), f"max err / bound {np.max(err / bound):.3g} for x {x.shape}, w {w.shape}"


# ----------------------------------------------------------------------------- parity
# V: 1, a few rows (below one 4-row tile), not a multiple of 4 / 16, several thread chunks (2053 x 768 elements
# is above the kernel's threading threshold; chunks are 336 rows at H = 768). H: one vector, a 4-lane tail
# (100 = 6 x 16 + 4), 768. B: 1..8 covers the full 4-row x-chunk and the 1/2/3-row remainders.
SHAPES = [(1, 64, 1), (1, 64, 3), (2, 100, 17), (3, 768, 1001), (4, 128, 4099), (5, 100, 2053), (6, 768, 2053),
          (7, 64, 50), (8, 768, 2053), (1, 768, 2053), (16, 96, 333)]


@pytest.mark.skipif(not ON_CPU, reason="the aot kernel runs on CPU")
@pytest.mark.parametrize("b,h,v", SHAPES)
def test_gemv_matches_float64_numpy_f32(pynative, b, h, v):
    x, w = _inputs(b, h, v, seed=b * 1000 + v)
    y = Gemv()(Tensor(x), Tensor(w)).asnumpy()
    _check_f32(y, x, w)
    _check_f32(MatMulNT()(Tensor(x), Tensor(w)).asnumpy(), x, w)          # the reference obeys the same bound


@pytest.mark.skipif(not ON_CPU, reason="the aot kernel runs on CPU")
@pytest.mark.parametrize("b,h,v", [(1, 64, 17), (3, 100, 1001), (5, 768, 2053)])
def test_gemv_matches_float64_numpy_f16(pynative, b, h, v):
    x, w = _inputs(b, h, v, np.float16, seed=v)
    y = Gemv()(Tensor(x), Tensor(w)).asnumpy()
    assert y.dtype == np.float16 and y.shape == (b, v)
    ref, bound = _reference(x, w)
    err = np.abs(y.astype(np.float64) - ref)
    tol = 2.0 ** -11 * np.abs(ref) + F32_TOL * bound + 2.0 ** -25
    assert (err <= tol).all(), f"max err - tol {np.max(err - tol):.3g}"


@pytest.mark.skipif(not ON_CPU, reason="the aot kernel runs on CPU")
def test_gemv_in_graph_mode_and_bprop():
    x, w = _inputs(3, 100, 1001, seed=7)
    g = np.random.default_rng(8).standard_normal((3, 1001)).astype(np.float32)

    class Loss(nn.Cell):
        def __init__(self):
            super().__init__()
            self.gemv = Gemv()

        def construct(self, x, w, g):
            return ops.sum(self.gemv(x, w) * g)

    net = Loss()
    y = net.gemv(Tensor(x), Tensor(w)).asnumpy()
    _check_f32(y, x, w)
    dx, dw = ms.grad(net, grad_position=(0, 1))(Tensor(x), Tensor(w), Tensor(g))
    x64, w64, g64 = x.astype(np.float64), w.astype(np.float64), g.astype(np.float64)
    np.testing.assert_array_less(np.abs(dx.asnumpy() - g64 @ w64), 1e-5 * (np.abs(g64) @ np.abs(w64)) + 1e-30)
    np.testing.assert_array_less(np.abs(dw.asnumpy() - g64.T @ x64), 1e-5 * (np.abs(g64.T) @ np.abs(x64)) + 1e-30)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("impl", ["gemv", "matmul"])
@pytest.mark.parametrize("xs,ws,xd,wd,match", [
    ((768,), (50, 768), np.float32, np.float32, r"x \(768,\), w \(50, 768\)"),          # x not rank 2
    ((1, 768), (2, 50, 768), np.float32, np.float32, r"w \(2, 50, 768\)"),              # w not rank 2
    ((2, 64), (50, 768), np.float32, np.float32, r"agree on H.*x \(2, 64\), w \(50, 768\)"),
    ((2, 64), (50, 64), np.float32, np.float16, r"share dtype.*Float32 and Float16"),
    ((2, 64), (50, 64), np.int32, np.int32, r"share dtype.*Int32"),
])
def test_bad_inputs_raise_value_error_naming_shapes(pynative, impl, xs, ws, xd, wd, match):
    if impl == "gemv" and not ON_CPU:
        pytest.skip("CPU kernel")
    cell = make_gemv(impl)
    with pytest.raises(ValueError, match=match):
        cell(Tensor(np.ones(xs, xd)), Tensor(np.ones(ws, wd)))


def test_select_head_impl_and_bad_names():
    assert select_head_impl("auto", 1, "CPU") == "gemv"
    assert select_head_impl("auto", GEMV_MAX_BATCH, "CPU") == "gemv"
    assert select_head_impl("auto", GEMV_MAX_BATCH + 1, "CPU") == "matmul"
    assert select_head_impl("auto", 1, "Ascend") == "matmul"
    assert select_head_impl("gemv", 64, "CPU") == "gemv" and select_head_impl("matmul", 1, "CPU") == "matmul"
    with pytest.raises(ValueError, match="head_impl must be one of 'auto', 'matmul', 'gemv', got 'fast'"):
        select_head_impl("fast", 1, "CPU")
    with pytest.raises(ValueError, match="unknown gemv impl 'auto'"):
        make_gemv("auto")


@pytest.mark.skipif(not ON_CPU, reason="the aot kernel runs on CPU")
def test_kernel_return_codes_refuse_bad_calls(aot_call):
    """The C++ entry point checks the aot call itself (what ops.Custom would hand it if the Python checks were
    bypassed): 0 = ok, 1 = wrong parameter count, 2 = wrong rank / inconsistent shapes, 3 = dtypes."""
    fn = ctypes.CDLL(build_library("gemv.cc")).GemvNT
    x, w = _inputs(2, 20, 7)

    def call(arrays, shapes, dtypes, nparam=3):
        return aot_call(fn, arrays, shapes, dtypes, nparam)

    y = np.zeros((2, 7), np.float32)
    assert call([x, w, y], [(2, 20), (7, 20), (2, 7)], ["float32"] * 3) == 0
    _check_f32(y, x, w)
    assert call([x, w, y], [(2, 20), (7, 20), (2, 7)], ["float32"] * 3, nparam=2) == 1
    assert call([x, w, y], [(2, 20), (7, 21), (2, 7)], ["float32"] * 3) == 2       # H mismatch
    assert call([x, w, y], [(2, 20), (7, 20), (2, 8)], ["float32"] * 3) == 2       # output shape
    assert call([x, w, y], [(40,), (7, 20), (2, 7)], ["float32"] * 3) == 2         # rank
    assert call([x, w, y], [(2, 20), (7, 20), (2, 7)], ["float32", "float16", "float32"]) == 3
    assert call([x, w, y], [(2, 20), (7, 20), (2, 7)], ["int32"] * 3) == 3


# ----------------------------------------------------------------------------- generation through the GEMV head
BASE = ModelConfig(arch="gpt", vocab_size=131, hidden_size=32, num_layers=1, num_heads=2, ffn_hidden_size=64,
                   max_position_embeddings=64, dropout=0.0, initializer_range=0.5, pad_token_id=0, eos_token_id=2)


@pytest.mark.skipif(not ON_CPU, reason="the aot kernel runs on CPU")
@pytest.mark.parametrize("tie", [True, False])
def test_generation_gemv_head_equals_matmul_head(tie):
    cfg = dataclasses.replace(BASE, tie_word_embeddings=tie)
    model = GPTLMHeadModel(cfg)
    model.init_weights(3)
    model.set_train(False)
    ids = np.random.default_rng(4).integers(3, cfg.vocab_size, (2, 5))
    mask = np.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0                                            # row 1 left-padded
    kw = dict(max_new_tokens=6, attention_mask=mask, eos_token_id=None, return_dict_in_generate=True,
              output_logits=True, prefill="forward")
    outs = {h: model.generate(ids, head_impl=h, **kw) for h in ("matmul", "gemv", "auto")}
    for h in ("gemv", "auto"):
        assert np.array_equal(outs[h].sequences, outs["matmul"].sequences)
        for a, b in zip(outs[h].logits, outs["matmul"].logits):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    cells = model._ms_llm_generation_steps[(2, 64)]
    assert sorted(cells.prefill) == ["gemv", "matmul"]                       # 'auto' at B = 2 on CPU is the GEMV
    assert sorted(h for h, _ in cells.decode) == ["gemv", "matmul"]
    assert isinstance(cells.prefill["gemv"].head, Gemv) and cells.prefill["matmul"].head is None
    for (head, _), step in cells.decode.items():                              # one graph each, shared caches
        prefill = cells.prefill[head]
        assert step.head is prefill.head
        assert len(step.compile_cache) == 1 and len(prefill.compile_cache) == 1
        assert all(c is d for c, d in zip(step.k_caches, cells.cache.keys))
    with pytest.raises(ValueError, match="head_impl must be one of"):
        model.generate(ids, head_impl="GEMV", max_new_tokens=2)
