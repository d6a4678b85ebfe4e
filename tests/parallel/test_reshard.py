"""Strategy files from logical axes, and checkpoint re-sharding / merging through MindSpore's offline tools.

A full checkpoint of a tiny GPT is sliced in numpy for layout A (dp2 x mp2: heads, FFN and vocabulary split on
the output dimension) and written as rank_<r>/ files; ``reshard`` turns them into layout B (4-way split of the
model width instead: the other matrix dimension, row <-> column) and ``merge`` back into one file. Both must
reproduce the parameters exactly (they only move bytes).
"""
import os

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from ms_llm.config import ModelConfig, ParallelConfig
from ms_llm.parallel.reshard import merge, rank_dirs, reshard, reshard_cli
from ms_llm.parallel.strategy import parameter_layouts, strategy_device_num, write_strategy_file

CFG = ModelConfig(arch="gpt", vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, ffn_hidden_size=64,
                  max_position_embeddings=16, dropout=0.0, tie_word_embeddings=False)
LAYOUT_A = ParallelConfig(mode="semi_auto_parallel", data_parallel=2, model_parallel=2)
LAYOUT_B = ParallelConfig(mode="semi_auto_parallel", data_parallel=1, model_parallel=4)
# layout B splits the model width (embed) 4 ways and keeps heads / FFN / vocabulary whole
RULES_B = {"batch": "dp", "seq": None, "embed": "mp", "heads": None, "kv": None, "head_dim": None, "mlp": None,
           "vocab": None, "expert": "ep", "capacity": None, "classes": None}


def model():
    from ms_llm.models.gpt import GPTLMHeadModel
    m = GPTLMHeadModel(CFG)
    rng = np.random.default_rng(3)
    for p in m.get_parameters():
        p.set_data(Tensor(rng.normal(size=tuple(p.shape)).astype(np.float32)))
    return m


def slice_for_rank(array, dev_matrix, tensor_map, rank):
    """Independent numpy transcription of MindSpore's layout: rank -> row-major coordinates in the device matrix;
    tensor dimension i is split by device dimension ``len(dev) - 1 - tensor_map[i]`` (-1 = whole)."""
    coords = np.unravel_index(rank, dev_matrix)
    index = []
    for axis, t in enumerate(tensor_map):
        if t == -1:
            index.append(slice(None))
            continue
        k = len(dev_matrix) - 1 - t
        size = array.shape[axis] // dev_matrix[k]
        index.append(slice(coords[k] * size, (coords[k] + 1) * size))
    return array[tuple(index)]


def load(path):
    return {k: v.asnumpy() for k, v in ms.load_checkpoint(path).items()}


@pytest.fixture(scope="module")
def setup_files(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("reshard"))
    m = model()
    full = {p.name: p.asnumpy() for p in m.get_parameters()}
    a, b = os.path.join(d, "strategy_a.ckpt"), os.path.join(d, "strategy_b.ckpt")
    write_strategy_file(m, LAYOUT_A, a)
    write_strategy_file(m, LAYOUT_B, b, rules=RULES_B)
    lay_a, lay_b = parameter_layouts(m, LAYOUT_A), parameter_layouts(m, LAYOUT_B, RULES_B)
    for r in range(4):
        os.makedirs(os.path.join(d, "src", f"rank_{r}"))
        ms.save_checkpoint([{"name": n, "data": Tensor(slice_for_rank(v, *lay_a[n], r))} for n, v in full.items()],
                           os.path.join(d, "src", f"rank_{r}", "step_2.ckpt"))
    return d, full, a, b, lay_a, lay_b


def test_parameter_layouts_are_the_axis_table():
    m = model()
    a, b = parameter_layouts(m, LAYOUT_A), parameter_layouts(m, LAYOUT_B, RULES_B)
    blk = "decoder.blocks.0."
    # device matrix (dp, mp); tensor map index 0 = the last (mp) dimension
    assert a[blk + "self_attn.q_proj.weight"] == ((2, 2), (0, -1))     # column parallel: output rows split
    assert a[blk + "self_attn.o_proj.weight"] == ((2, 2), (-1, 0))     # row parallel: input columns split
    assert a[blk + "ffn.fc_in.bias"] == ((2, 2), (0,))
    assert a[blk + "ffn.fc_out.bias"] == ((2, 2), (-1,))
    assert a["decoder.embed_tokens.weight"] == ((2, 2), (0, -1))        # vocabulary rows
    assert a["decoder.embed_positions.weight"] == ((2, 2), (-1, -1))
    assert a[blk + "attn_norm.weight"] == ((2, 2), (-1,))
    assert b[blk + "self_attn.q_proj.weight"] == ((1, 4), (-1, 0))     # model width split instead
    assert b[blk + "self_attn.o_proj.weight"] == ((1, 4), (0, -1))
    assert b["lm_head.weight"] == ((1, 4), (-1, 0))
    assert b[blk + "attn_norm.weight"] == ((1, 4), (0,))
    assert set(a) == {p.name for p in m.get_parameters()}


def test_strategy_file_is_read_by_mindspore(setup_files):
    d, full, a, b, lay_a, _ = setup_files
    from mindspore.parallel import build_searched_strategy
    layouts = build_searched_strategy(a)
    assert set(layouts) == set(full)
    q = layouts["decoder.blocks.0.self_attn.q_proj.weight"]
    assert list(q.dev_matrix[0].dim) == [2, 2] and list(q.tensor_map[0].dim) == [0, -1]
    assert strategy_device_num(a) == 4 and strategy_device_num(b) == 4
    assert rank_dirs(os.path.join(d, "src")) == [0, 1, 2, 3]


def test_reshard_then_merge_reproduces_parameters_exactly(setup_files, tmp_path):
    d, full, a, b, _, lay_b = setup_files
    files = reshard(os.path.join(d, "src"), a, b, str(tmp_path / "b"))
    assert len(files) == 4
    for r, f in enumerate(files):
        got = load(f)
        assert set(got) == set(full)
        for n, v in full.items():
            want = slice_for_rank(v, *lay_b[n], r)
            assert got[n].shape == want.shape, (n, got[n].shape, want.shape)
            np.testing.assert_array_equal(got[n], want, err_msg=f"rank {r} {n}")
    merged = merge(str(tmp_path / "b"), b, str(tmp_path / "merged.ckpt"))
    got = load(merged)
    for n, v in full.items():
        np.testing.assert_array_equal(got[n], v, err_msg=n)


def test_cli_merges_and_reports_bad_input(setup_files, tmp_path, capsys):
    d, full, a, b, _, _ = setup_files
    out = str(tmp_path / "one.ckpt")
    assert reshard_cli(["--src", os.path.join(d, "src"), "--src-strategy", a, "--out", out, "--merge"]) == 0
    got = load(out)
    for n, v in full.items():
        np.testing.assert_array_equal(got[n], v, err_msg=n)
    with pytest.raises(SystemExit):
        reshard_cli(["--src", os.path.join(d, "src"), "--src-strategy", a, "--out", out])   # no --dst-strategy
    with pytest.raises(ValueError, match=r"describes 4 ranks but .* holds checkpoints of ranks \[0, 1\]"):
        _two_rank_source(d, a, tmp_path)
    with pytest.raises(FileNotFoundError, match="destination strategy file not found"):
        reshard(os.path.join(d, "src"), a, str(tmp_path / "missing.ckpt"), str(tmp_path / "y"))


def _two_rank_source(d, a, tmp_path):
    """A source folder with only ranks 0..1 of a 4-rank layout must be refused before MindSpore reads it."""
    src = tmp_path / "partial"
    for r in range(2):
        (src / f"rank_{r}").mkdir(parents=True)
        os.link(os.path.join(d, "src", f"rank_{r}", "step_2.ckpt"), src / f"rank_{r}" / "step_2.ckpt")
    reshard(str(src), a, None, str(tmp_path / "z"))
