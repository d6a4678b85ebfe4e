"""Linear: both forms of the product (x W^T, and (W x^T)^T for 4..32 rows in CPU inference) against numpy."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from ms_llm.layers.linear import SWAP_ROWS, Linear


@pytest.mark.parametrize("rows", [1, 3, 4, 8, 32, 33])
def test_inference_forms_match_numpy(rows, rng):
    lin = Linear(24, 40, init_std=0.5)
    w = rng.standard_normal((40, 24)).astype(np.float32)
    b = rng.standard_normal(40).astype(np.float32)
    lin.weight.set_data(Tensor(w))
    lin.bias.set_data(Tensor(b))
    lin.set_train(False)
    x = rng.standard_normal((rows, 24)).astype(np.float32)
    assert lin.swapped(rows) == (SWAP_ROWS[0] <= rows <= SWAP_ROWS[1])       # the test runs on CPU
    y = lin(Tensor(x)).asnumpy()
    ref = x.astype(np.float64) @ w.T.astype(np.float64) + b                 # fp32 products, fp64 reference
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    lin.set_train(True)                                                      # training keeps the direct form
    assert not lin.swapped(rows)
    assert ms.get_context("device_target") == "CPU"
