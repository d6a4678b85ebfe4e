"""prepare(): what a training run does to a model per layout, and the strategy file kept beside checkpoints."""
import os

import pytest
from mindspore import nn

from ms_llm.config import ModelConfig, ParallelConfig
from ms_llm.parallel.context import ParallelInfo
from ms_llm.parallel.prepare import grad_reducer, prepare, shards_cells
from ms_llm.parallel.strategy import save_strategy_beside


def tiny_gpt():
    from ms_llm.models.gpt import GPTLMHeadModel
    return GPTLMHeadModel(ModelConfig(arch="gpt", vocab_size=32, hidden_size=16, num_layers=2, num_heads=2,
                                      ffn_hidden_size=32, max_position_embeddings=8, dropout=0.0))


class Loss(nn.Cell):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def construct(self, ids):
        return self.model(ids).sum()


def test_stand_alone_only_recomputes():
    model = tiny_gpt()
    loss = Loss(model)
    info = ParallelInfo(mode="stand_alone", device_target="CPU", rank=0, world_size=1)
    out = prepare(model, loss, ParallelConfig(recompute="selective"), info)
    assert out.loss_net is loss and out.table == {} and out.stage_plan == {} and out.expert_params == []
    assert out.recomputed == ["decoder.blocks.0.self_attn.core", "decoder.blocks.1.self_attn.core"]
    assert grad_reducer([], [], info, out) is None


def test_semi_auto_pipeline_shards_places_and_wraps():
    model = tiny_gpt()
    cfg = ParallelConfig(mode="semi_auto_parallel", data_parallel=2, model_parallel=2, pipeline_stages=2,
                         micro_batches=2, recompute="full")
    info = ParallelInfo(mode=cfg.mode, device_target="Ascend", rank=0, world_size=8, data_parallel=2,
                        model_parallel=2, pipeline_stages=2)
    out = prepare(model, Loss(model), cfg, info)
    assert out.table["decoder.blocks.1.ffn.fc_in.matmul"] == ((2, 1), (2, 1))
    assert out.stage_plan["decoder.blocks.0"] == 0 and out.stage_plan["decoder.blocks.1"] == 1
    assert out.recomputed == ["decoder.blocks.0", "decoder.blocks.1"]
    assert type(out.loss_net).__name__ == "MeanOverMicroBatches"
    assert grad_reducer([], [], info, out) is None          # MindSpore inserts the reductions itself


@pytest.mark.parametrize("mode,search,want", [("semi_auto_parallel", "sharding_propagation", True),
                                              ("auto_parallel", "sharding_propagation", True),
                                              ("auto_parallel", "recursive_programming", False),
                                              ("data_parallel", "sharding_propagation", False)])
def test_which_modes_use_the_cells_strategies(mode, search, want):
    assert shards_cells(ParallelConfig(mode=mode, data_parallel=2, search_mode=search)) is want


def test_strategy_file_beside_checkpoints(tmp_path):
    from mindspore.parallel import build_searched_strategy
    model = tiny_gpt()
    cfg = ParallelConfig(mode="data_parallel", data_parallel=2)
    info = ParallelInfo(mode=cfg.mode, device_target="CPU", rank=0, world_size=2, data_parallel=2)
    path = save_strategy_beside(model, cfg, info, str(tmp_path / "ckpt"))
    layouts = build_searched_strategy(path)
    q = layouts["decoder.blocks.0.self_attn.q_proj.weight"]
    assert list(q.dev_matrix[0].dim) == [2, 1] and list(q.tensor_map[0].dim) == [-1, -1]   # data parallel: whole
    written = ParallelInfo(mode="semi_auto_parallel", device_target="Ascend", rank=0, world_size=2,
                           strategy_file=str(tmp_path / "ms" / "strategy.ckpt"))
    with pytest.raises(FileNotFoundError, match="has not written the strategy file"):
        save_strategy_beside(model, cfg, written, str(tmp_path / "ckpt2"))
    os.makedirs(tmp_path / "ms")
    (tmp_path / "ms" / "strategy.ckpt").write_bytes(open(path, "rb").read())
    copied = save_strategy_beside(model, cfg, written, str(tmp_path / "ckpt2"))
    assert open(copied, "rb").read() == open(path, "rb").read()
