"""Expert parallelism in data-parallel mode: the MoE layer across 2- and 4-rank expert groups (one 4-process msrun
launch, AllGather exchange on CPU) equals the single-process layer on each rank's tokens, output and gradients;
GradReducer then averages shared weights over the world and expert weights over the ranks holding them."""
import os
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "workers"))

from ep_case import NUM_EXPERTS, WORLD, LayerLoss, build_layer, rank_inputs  # noqa: E402

TOL = 1e-5   # float32, same ops in a different order (exchange, concatenation of the groups' tokens)


@pytest.fixture(scope="module")
def ref():
    return reference()


def reference():
    """Per rank: output, aux loss, input gradient and weight gradients of the full single-process layer."""
    import mindspore as ms
    from mindspore import Tensor
    net = LayerLoss(build_layer())
    params = net.trainable_params()
    grad = ms.value_and_grad(net, 0, params, has_aux=True)
    out = []
    for r in range(WORLD):
        x, w = rank_inputs(r)
        (loss, y, aux), (gx, gp) = grad(Tensor(x), Tensor(w))
        out.append({"y": y.asnumpy(), "aux": aux.asnumpy(), "loss": loss.asnumpy(), "gx": gx.asnumpy(),
                    **{f"g/{p.name}": g.asnumpy() for p, g in zip(params, gp)}})
    return out


def expert_grad(ref, name, first, ep):
    """Gradient of expert weight ``name`` from the tokens of the group starting at rank ``first``."""
    return sum(ref[s][f"g/{name}"] for s in range(first, first + ep))


@pytest.fixture(scope="module")
def ep_results(tmp_path_factory):
    from ptest_common import msrun
    d = str(tmp_path_factory.mktemp("ep"))
    msrun(os.path.join(HERE, "workers", "ep_dispatch.py"), WORLD, d, args=[d])
    return {(ep, r): dict(np.load(os.path.join(d, f"ep{ep}_rank{r}.npz"))) for ep in (2, 4) for r in range(WORLD)}


@pytest.mark.distributed
@pytest.mark.parametrize("ep", [2, 4])
def test_expert_parallel_layer_matches_single_process(ep_results, ref, ep):
    check(ep_results, ref, ep)


def check(ep_results, ref, ep):
    local = NUM_EXPERTS // ep
    for r in range(WORLD):
        got = ep_results[(ep, r)]
        np.testing.assert_array_equal(got["x"], rank_inputs(r)[0])
        for key in ("y", "aux", "loss", "gx"):
            np.testing.assert_allclose(got[key], ref[r][key], rtol=TOL, atol=TOL, err_msg=f"ep={ep} rank={r} {key}")
        experts = set(got["expert_names"].tolist())
        assert experts == {f"layer.experts.{n}" for n in ("w_in", "w_out", "b_in", "b_out")}
        assert {k[2:] for k in got if k.startswith("r/")} == {k[2:] for k in got if k.startswith("g/")} == \
            {k[2:] for k in ref[r] if k.startswith("g/")}
        first = r - r % ep
        lo = (r % ep) * local
        for key in (k for k in got if k.startswith(("g/", "r/"))):
            name = key[2:]
            if name in experts:
                # the owner of experts [lo, lo+local) receives the tokens of every member of its group
                want = expert_grad(ref, name, first, ep)[lo:lo + local]
                if key.startswith("r/"):                 # then averaged over the groups (same experts)
                    groups = range(0, WORLD, ep)
                    want = sum(expert_grad(ref, name, g, ep) for g in groups)[lo:lo + local] / len(groups)
            elif key.startswith("g/"):
                want = ref[r][f"g/{name}"]               # router: this rank's own tokens only
            else:
                want = sum(ref[s][f"g/{name}"] for s in range(WORLD)) / WORLD   # world mean
            assert got[key].shape == want.shape, (key, got[key].shape, want.shape)
            np.testing.assert_allclose(got[key], want, rtol=TOL, atol=TOL, err_msg=f"ep={ep} rank={r} {key}")


@pytest.mark.ascend
def test_hccl_alltoall_exchange_matches_single_process(ref, tmp_path):
    """On an Ascend host (4 NPUs) the same worker resolves expert_exchange=auto to HCCL AlltoAll."""
    from ptest_common import msrun
    msrun(os.path.join(HERE, "workers", "ep_dispatch.py"), WORLD, str(tmp_path), args=[str(tmp_path), "Ascend"])
    results = {(ep, r): dict(np.load(tmp_path / f"ep{ep}_rank{r}.npz")) for ep in (2, 4) for r in range(WORLD)}
    for ep in (2, 4):
        check(results, ref, ep)
