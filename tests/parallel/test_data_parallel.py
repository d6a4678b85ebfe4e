"""Data parallelism on CPU: two msrun processes (mccl AllReduce) train a tiny GPT and a tiny MoE GPT to the same
weights as one process on the full batch; the trainer's TrainStep with BufferReducer between accumulation and update,
each rank feeding half of every global batch, rank 1 initialised differently and fixed by broadcast_parameters."""
import os
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "workers"))

from dp_case import KINDS, STEPS, train  # noqa: E402

# float32 gradients summed in another order (two half-batch means, then AllReduce) feed AdamW, whose normalised
# update m / sqrt(v) amplifies relative gradient differences of ~1e-7 where gradients are tiny (rarely routed
# experts): measured up to 1.1e-5 after 3 steps of lr 1e-2; 5e-5 is 0.5% of one step, far below a wrong reduction
ATOL = 5e-5


@pytest.fixture(scope="module")
def dp_results(tmp_path_factory):
    from ptest_common import msrun
    d = str(tmp_path_factory.mktemp("dp"))
    msrun(os.path.join(HERE, "workers", "dp_train.py"), 2, d, args=[d])
    return {(k, r): dict(np.load(os.path.join(d, f"{k}_rank{r}.npz"))) for k in KINDS for r in range(2)}


@pytest.mark.distributed
@pytest.mark.parametrize("kind", KINDS)
def test_two_process_data_parallel_equals_one_process(dp_results, kind):
    initial, ref_weights, ref_losses = train(kind)
    r0, r1 = dp_results[(kind, 0)], dp_results[(kind, 1)]
    assert len(r0["losses"]) == STEPS
    # the mean of the two half-batch losses is the full-batch loss (equal token counts per half)
    np.testing.assert_allclose((r0["losses"] + r1["losses"]) / 2, ref_losses, rtol=1e-5)
    names = {k[2:] for k in r0 if k.startswith("w/")}
    assert names == set(ref_weights) == set(initial)
    moved = 0.0
    for n in sorted(names):
        np.testing.assert_array_equal(r0[f"w/{n}"], r1[f"w/{n}"], err_msg=f"ranks disagree on {n}")
        np.testing.assert_allclose(r0[f"w/{n}"], ref_weights[n], atol=ATOL, rtol=0, err_msg=f"{kind} {n}")
        moved = max(moved, float(np.abs(ref_weights[n] - initial[n]).max()))
    assert moved > 1e-3, "training did not move the weights: the comparison would be vacuous"
