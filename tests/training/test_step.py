"""Train step: gradient accumulation equivalence, loss-scale overflow handling, AdamW against a numpy transcription."""
import dataclasses

import numpy as np
import pytest
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from ms_llm.config import ModelConfig, TrainConfig
from ms_llm.models import build_model
from ms_llm.training.optim import AdamW, lr_at
from ms_llm.training.seq2seq_task import Seq2SeqLoss
from ms_llm.training.step import TrainStep

CFG = ModelConfig(arch="transformer", vocab_size=16, hidden_size=16, num_layers=1, num_decoder_layers=1,
                  num_heads=2, ffn_hidden_size=32, max_position_embeddings=8, dropout=0.0)


def _model_and_batch(seed=0):
    ms.set_seed(seed)
    model = build_model(CFG)
    rng = np.random.default_rng(seed)
    b, s = 8, 6
    src = rng.integers(3, 16, size=(b, s)).astype(np.int32)
    tgt = rng.integers(3, 16, size=(b, s)).astype(np.int32)
    ones = np.ones((b, s), np.float32)
    labels = rng.integers(3, 16, size=(b, s)).astype(np.int32)
    return model, (src, ones, tgt, ones, labels, ones)


def _train(k, steps=2):
    model, batch = _model_and_batch()
    tcfg = TrainConfig(batch_size=8, grad_accum_steps=k, grad_clip=1.0, weight_decay=0.1)
    ts = TrainStep(Seq2SeqLoss(model, 0.1), model.trainable_params(), tcfg, dynamic_scale=False)
    m = 8 // k
    mbs = [tuple(a[i * m:(i + 1) * m] for a in batch) for i in range(k)]
    for mb in mbs:                                   # the averaged gradient the update will use
        ts.accumulate(*[Tensor(a) for a in mb])
    grads = {p.name: a.asnumpy() / k for p, a in zip(ts.params, ts.accum)}
    for a in ts.accum:
        a.set_data(Tensor(np.zeros(a.shape, np.float32)))
    losses = [ts.step(mbs, 1e-2)[0] for _ in range(steps)]
    return {n: p.asnumpy() for n, p in model.parameters_and_names()}, losses, grads


def test_accumulation_equals_large_batch():
    # every sequence has the same number of tokens, so the mean of micro-batch means is the full-batch mean
    w1, l1, g1 = _train(1)
    w4, l4, g4 = _train(4)
    np.testing.assert_allclose(l4, l1, rtol=1e-5)
    for n in g1:
        np.testing.assert_allclose(g4[n], g1[n], rtol=1e-4, atol=1e-6, err_msg=n)
    for n in w1:
        if n.endswith("k_proj.bias"):
            # softmax is shift-invariant, so this gradient is exactly 0 in exact arithmetic: Adam normalises float
            # noise of ~1e-9 to a +-lr step whose sign is arbitrary, in both runs alike
            continue
        np.testing.assert_allclose(w4[n], w1[n], atol=2e-6, err_msg=n)


def test_overflow_skips_update_and_halves_scale():
    model, batch = _model_and_batch()
    tcfg = TrainConfig(batch_size=8, loss_scale=1024.0, loss_scale_factor=2.0, loss_scale_window=2)
    ts = TrainStep(Seq2SeqLoss(model, 0.0), model.trainable_params(), tcfg, dynamic_scale=True)
    before = {n: p.asnumpy().copy() for n, p in model.parameters_and_names()}
    ts.accumulate(*[Tensor(a) for a in batch])
    acc0 = ts.accum[0]
    acc0.set_data(Tensor(np.full(acc0.shape, np.inf, np.float32)))
    finite, norm, scale = ts.apply(Tensor(1e-2, ms.float32))
    assert not bool(finite.asnumpy()) and float(scale.asnumpy()) == 512.0
    for n, p in model.parameters_and_names():
        np.testing.assert_array_equal(p.asnumpy(), before[n], err_msg=n)
    assert all(float(np.abs(a.asnumpy()).max()) == 0.0 for a in ts.accum)   # buffers cleared
    # two clean steps grow the scale back (window 2)
    for _ in range(2):
        loss, finite, _, scale = ts.step([batch], 1e-3)
        assert finite
    assert scale == 1024.0


def test_fp16_training_runs_with_loss_scaling():
    cfg16 = dataclasses.replace(CFG, compute_dtype="float16")
    ms.set_seed(0)
    model = build_model(cfg16)
    _, batch = _model_and_batch()
    ts = TrainStep(Seq2SeqLoss(model, 0.0), model.trainable_params(), TrainConfig(batch_size=8), dynamic_scale=True)
    losses = [ts.step([batch], 3e-3)[0] for _ in range(8)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("grad_scale", [None, 0.37])
def test_adamw_matches_numpy(impl, grad_scale):
    """Exact AdamW (bias-corrected, decoupled decay, none on biases) against float64 numpy, for both per-parameter
    updates; ``grad_scale`` (the clip factor the step passes) multiplies the gradients first. The 300k-element
    parameter runs the fused kernel's multi-threaded path (>= 2^17 elements)."""
    rng = np.random.default_rng(1)
    init = {"dense.weight": rng.normal(size=(3, 4)), "dense.bias": rng.normal(size=(4,)),
            "embed.weight": rng.normal(size=(600, 500))}
    params = [Parameter(Tensor(v.astype(np.float32)), name=k) for k, v in init.items()]
    opt = AdamW(params, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.1, impl=impl)
    assert opt.impl == impl
    ref = [v.astype(np.float32).astype(np.float64) for v in init.values()]
    ms_, vs_ = [np.zeros_like(r) for r in ref], [np.zeros_like(r) for r in ref]
    wds = (0.1, 0.0, 0.1)                                                     # no decay on biases
    for t in range(1, 4):
        grads = [rng.normal(size=r.shape).astype(np.float32) for r in ref]
        lr = 0.01 * t
        if grad_scale is None:
            opt(tuple(Tensor(g) for g in grads), Tensor(lr, ms.float32))
        else:
            opt(tuple(Tensor(g) for g in grads), Tensor(lr, ms.float32), Tensor(grad_scale, ms.float32))
        c = 1.0 if grad_scale is None else grad_scale
        for p, g, m, v, wd in zip(ref, grads, ms_, vs_, wds):
            g = g * c
            m[...] = 0.9 * m + 0.1 * g
            v[...] = 0.98 * v + 0.02 * g * g
            p -= lr * ((m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.98 ** t)) + 1e-8) + wd * p)
    for param, want in zip(params, ref):
        np.testing.assert_allclose(param.asnumpy(), want, rtol=1e-5, atol=1e-6, err_msg=param.name)


def test_schedules():
    t = TrainConfig(lr=1e-3, min_lr=1e-5, warmup_steps=10, steps=110, schedule="cosine")
    assert lr_at(0, t, 64) == pytest.approx(1e-4)
    assert lr_at(9, t, 64) == pytest.approx(1e-3)
    assert lr_at(59, t, 64) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert lr_at(109, t, 64) == pytest.approx(1e-5)
    lin = dataclasses.replace(t, schedule="linear")
    assert lr_at(59, lin, 64) == pytest.approx(1e-3 + (1e-5 - 1e-3) * 0.5)
    # Vaswani eq. 3: d^-0.5 * min(n^-0.5, n * warmup^-1.5), peak at n = warmup
    inv = TrainConfig(lr=1.0, warmup_steps=4000, steps=100000, schedule="inverse_sqrt")
    assert lr_at(3999, inv, 512) == pytest.approx(512 ** -0.5 * 4000 ** -0.5)
    assert lr_at(15999, inv, 512) == pytest.approx(512 ** -0.5 * 16000 ** -0.5)
    assert lr_at(0, inv, 512) == pytest.approx(512 ** -0.5 * 4000 ** -1.5)


@pytest.mark.parametrize("kernel", [True, False])
def test_clip_norm_of_both_sum_of_squares_paths(kernel):
    """ClipAndApply's global norm (CPU: the one-pass kernel; elsewhere MindSpore ops, forced here by dropping the
    kernel) equals numpy's sqrt(sum g^2) times the pre-scale, to float32 rounding (2e-6 relative)."""
    from ms_llm.training.step import ClipAndApply
    rng = np.random.default_rng(3)
    shapes = [(37, 11), (5,), (3, 4, 700)]
    params = [Parameter(Tensor(rng.standard_normal(s).astype(np.float32)), name=f"p{i}")
              for i, s in enumerate(shapes)]
    grads = tuple(Tensor((rng.standard_normal(s) * 10.0 ** i).astype(np.float32)) for i, s in enumerate(shapes))
    step = ClipAndApply(AdamW(params), clip=1.0)
    assert (step.sum_squares is not None) == (ms.get_context("device_target") == "CPU")
    if not kernel:
        step.sum_squares = None
    finite, norm = step(grads, Tensor(1e-3, ms.float32), Tensor(0.5, ms.float32))
    want = 0.5 * np.sqrt(sum(float((g.asnumpy().astype(np.float64) ** 2).sum()) for g in grads))
    assert bool(finite.asnumpy()) and norm.shape == ()
    assert abs(float(norm.asnumpy()) - want) <= 2e-6 * want
