"""On a host with CANN (Ascend target, no NPU needed): a dry-run compile of the tiny GPT under semi-auto parallel
(dp2 x mp4) must slice every weight the way the strategy derived from ms_llm's logical axes says. MindSpore 2.10
refuses semi-auto parallel and dry runs on CPU, so this is skipped there."""
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def slice_shapes(path, rank=0):
    """Parameter -> shape of ``rank``'s slice, per split factor of the layout (the weight shape is not needed:
    the ratio is what both files must agree on)."""
    from mindspore.parallel import build_searched_strategy
    out = {}
    for name, lay in build_searched_strategy(path).items():
        dev = list(lay.dev_matrix[0].dim)
        tmap = list(lay.tensor_map[0].dim)
        out[name] = tuple(1 if t == -1 else dev[len(dev) - 1 - t] for t in tmap)
    return out


@pytest.mark.ascend
def test_dry_run_strategy_matches_logical_axes(tmp_path):
    env = dict(os.environ, MS_SIMULATION_LEVEL="0", RANK_SIZE="8", RANK_ID="0",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, os.path.join(HERE, "workers", "semi_auto_compile.py"), str(tmp_path)],
                   env=env, check=True, timeout=600)
    ours = slice_shapes(str(tmp_path / "ms_llm_strategy.ckpt"))
    theirs = slice_shapes(str(tmp_path / "mindspore_strategy.ckpt"))
    weights = [n for n in ours if n in theirs]
    assert len(weights) >= 20, sorted(theirs)
    for n in weights:
        assert ours[n] == theirs[n], (n, ours[n], theirs[n])
    assert ours["decoder.blocks.0.self_attn.q_proj.weight"] == (4, 1)
