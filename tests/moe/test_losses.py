"""Auxiliary losses (ms_llm.moe.losses) against numpy transcriptions of the papers' formulas (float64 reference,
float32 under test: rtol 1e-5)."""
import numpy as np
import pytest
from mindspore import Tensor, nn

from ms_llm.moe import losses
import moe_numpy_ref as ref

RTOL = 1e-5


class Fn(nn.Cell):
    """Runs a loss function inside a compiled graph."""

    def __init__(self, fn, *static):
        super().__init__()
        self.fn = fn
        self.static = static

    def construct(self, *args):
        return self.fn(*args, *self.static)


def t(a, dtype=np.float32):
    return Tensor(np.asarray(a).astype(dtype))


def test_switch_load_balance_matches_paper_and_is_one_when_uniform(rng):
    logits = rng.normal(size=(3, 10, 4))
    probs = ref.softmax(logits)
    top1 = probs.argmax(-1)
    got = float(Fn(losses.switch_load_balance)(t(probs), t(top1, np.int32)).asnumpy())
    assert got == pytest.approx(ref.switch_load_balance(probs, top1), rel=RTOL)
    # Hugging Face's form of the same loss: E^2 * mean over (group, expert) of f * P
    f = np.stack([(top1 == i).mean(1) for i in range(4)], -1)
    assert got == pytest.approx(16 * np.mean(f * probs.mean(1)), rel=RTOL)
    uniform = np.full((1, 8, 4), 0.25)
    top1_u = np.array([[0, 1, 2, 3, 0, 1, 2, 3]])
    assert float(Fn(losses.switch_load_balance)(t(uniform), t(top1_u, np.int32)).asnumpy()) == pytest.approx(1.0)


def test_z_loss(rng):
    logits = rng.normal(size=(2, 5, 6)) * 3
    got = float(Fn(losses.router_z_loss)(t(logits)).asnumpy())
    assert got == pytest.approx(ref.z_loss(logits), rel=RTOL)


def test_importance_loss_and_cv_squared(rng):
    gates = rng.random((2, 7, 5))
    got = float(Fn(losses.importance_loss)(t(gates)).asnumpy())
    assert got == pytest.approx(ref.cv_squared(gates.reshape(-1, 5).sum(0)), rel=RTOL)
    assert float(Fn(losses.cv_squared)(t(np.ones(4))).asnumpy()) == pytest.approx(0.0, abs=1e-7)
    assert float(Fn(losses.cv_squared)(t(np.zeros(4))).asnumpy()) == 0.0     # eps keeps it finite


@pytest.mark.parametrize("k", [1, 2, 3])
def test_smooth_load_is_equation_9(rng, k):
    n, e = 6, 5
    clean = rng.normal(size=(n, e))
    std = ref.softplus(rng.normal(size=(n, e)))
    noisy = clean + rng.normal(size=(n, e)) * std
    got = Fn(losses.smooth_load, k)(t(clean), t(noisy), t(std)).asnumpy()
    want = np.array([[ref.normal_cdf((clean[i, j] - ref.kth_excluding(noisy[i], k, j)) / std[i, j])
                      for j in range(e)] for i in range(n)])
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-6)
    got_loss = float(Fn(losses.load_loss)(t(want)).asnumpy())
    assert got_loss == pytest.approx(ref.cv_squared(want.sum(0)), rel=RTOL)


def test_smooth_load_rejects_k_equal_to_experts():
    x = t(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="k < num_experts"):
        losses.smooth_load(x, x, x, 3)
