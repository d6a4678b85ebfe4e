"""Parallel config validation and its mapping onto MindSpore's auto-parallel context (plain data, no devices)."""
import numpy as np
import pytest

from ms_llm.config import ConfigError, ModelConfig, MoEConfig, ParallelConfig, RunConfig, TrainConfig
from ms_llm.parallel import context
from ms_llm.parallel.context import (ParallelInfo, ParallelUnsupportedError, auto_parallel_kwargs, check_supported,
                                     check_world)


def test_kwargs_stand_alone_and_data_parallel():
    assert auto_parallel_kwargs(ParallelConfig(), 1) == {"parallel_mode": "stand_alone"}
    assert auto_parallel_kwargs(ParallelConfig(mode="data_parallel", data_parallel=4), 4, "ignored.ckpt") == {
        "parallel_mode": "data_parallel", "device_num": 4, "gradients_mean": True,
        "dataset_strategy": "data_parallel"}


def test_kwargs_semi_auto_with_everything():
    cfg = ParallelConfig(mode="semi_auto_parallel", data_parallel=4, model_parallel=2, pipeline_stages=2,
                         expert_parallel=2, micro_batches=4, optimizer_shard=True, gradient_accumulation_shard=True)
    assert auto_parallel_kwargs(cfg, 16, "/run/strategy.ckpt") == {
        "parallel_mode": "semi_auto_parallel", "device_num": 16, "gradients_mean": True,
        "dataset_strategy": "full_batch", "parameter_broadcast": True, "pipeline_stages": 2,
        "enable_parallel_optimizer": True, "parallel_optimizer_config": {"optimizer_level": "level2"},
        "enable_alltoall": True,
        "strategy_ckpt_config": {"save_file": "/run/strategy.ckpt", "only_trainable_params": False}}


@pytest.mark.parametrize("search", ["sharding_propagation", "recursive_programming"])
def test_kwargs_auto_parallel_search(search):
    cfg = ParallelConfig(mode="auto_parallel", data_parallel=8, search_mode=search)
    assert auto_parallel_kwargs(cfg, 8) == {
        "parallel_mode": "auto_parallel", "device_num": 8, "gradients_mean": True, "dataset_strategy": "full_batch",
        "parameter_broadcast": True, "pipeline_stages": 1, "enable_parallel_optimizer": False,
        "search_mode": search}


@pytest.mark.parametrize("cfg,needle", [
    (ParallelConfig(mode="semi_auto_parallel", data_parallel=2), "parallel.mode=semi_auto_parallel"),
    (ParallelConfig(mode="auto_parallel", data_parallel=2), "parallel.mode=auto_parallel"),
    (ParallelConfig(mode="semi_auto_parallel", pipeline_stages=2, micro_batches=2), "parallel.pipeline_stages=2"),
    (ParallelConfig(mode="data_parallel", data_parallel=2, optimizer_shard=True), "optimizer_shard"),
])
def test_cpu_refuses_what_needs_ascend(cfg, needle):
    with pytest.raises(ParallelUnsupportedError, match="needs an Ascend device") as e:
        check_supported(cfg, "CPU")
    assert needle in str(e.value)
    check_supported(cfg, "Ascend")      # the same layout is fine on Ascend


def test_cpu_refuses_dry_run_and_alltoall(monkeypatch):
    with pytest.raises(ParallelUnsupportedError, match="dry run"):
        check_supported(ParallelConfig(mode="data_parallel", data_parallel=2), "CPU", dry_run=True)
    with pytest.raises(ValueError, match="no AlltoAll kernel on CPU"):
        check_supported(ParallelConfig(mode="data_parallel", data_parallel=2, expert_parallel=2,
                                       expert_exchange="alltoall"), "CPU")
    # setup reads MindSpore's dry-run variable and refuses before touching the device
    monkeypatch.setenv("MS_SIMULATION_LEVEL", "1")
    with pytest.raises(ParallelUnsupportedError, match="dry run"):
        context.setup(ParallelConfig(), "CPU")


def test_world_size_must_match_degrees():
    check_world(ParallelConfig(mode="data_parallel", data_parallel=4), 4)
    with pytest.raises(ValueError, match=r"= 4, but the job has 2 processes"):
        check_world(ParallelConfig(mode="data_parallel", data_parallel=4), 2)
    with pytest.raises(ValueError, match="stand_alone, but the job has 2 processes"):
        check_world(ParallelConfig(), 2)


def test_stand_alone_config_under_a_launcher_is_refused(monkeypatch):
    monkeypatch.setenv("MS_WORKER_NUM", "2")          # what msrun exports to every worker
    with pytest.raises(ValueError, match="stand_alone, but the job has 2 processes"):
        context.setup(ParallelConfig(), "CPU")


def test_setup_stand_alone_on_cpu():
    import mindspore as ms
    info = context.setup(ParallelConfig(), "CPU")
    assert (info.rank, info.world_size, info.mode, info.distributed) == (0, 1, "stand_alone", False)
    assert ms.get_auto_parallel_context("parallel_mode") == "stand_alone"
    assert info.expert_exchange == "allgather"


def test_local_batch_slices_by_rank():
    ids = np.arange(12).reshape(6, 2)
    info = ParallelInfo(mode="data_parallel", device_target="CPU", rank=1, world_size=3)
    (part,) = info.local_batch((ids,))
    np.testing.assert_array_equal(part, ids[2:4])
    full = ParallelInfo(mode="semi_auto_parallel", device_target="Ascend", rank=1, world_size=3)
    assert full.local_batch((ids,))[0] is ids
    with pytest.raises(ValueError, match="cannot be split over 4"):
        ParallelInfo(mode="data_parallel", device_target="CPU", rank=0, world_size=4).local_batch((ids,))


@pytest.mark.parametrize("kw,key", [
    (dict(mode="data_parallel", data_parallel=2, expert_parallel=4), "parallel.expert_parallel"),
    (dict(mode="semi_auto_parallel", data_parallel=1, model_parallel=2, expert_parallel=2), "parallel.expert_parallel"),
    (dict(mode="data_parallel", data_parallel=2, model_parallel=2), "parallel.mode"),
    (dict(mode="semi_auto_parallel", pipeline_stages=4, micro_batches=2), "parallel.micro_batches"),
    (dict(mode="data_parallel", data_parallel=2, micro_batch_interleave=2), "parallel.micro_batch_interleave"),
    (dict(mode="semi_auto_parallel", data_parallel=2, device_num=8), "parallel.device_num"),
])
def test_parallel_config_errors_name_the_key(kw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        ParallelConfig(**kw)


@pytest.mark.parametrize("model_kw,par_kw,needle", [
    (dict(num_heads=6, hidden_size=48), dict(model_parallel=4), "num_heads=6"),
    (dict(vocab_size=50), dict(model_parallel=4), "vocab_size=50"),
    (dict(ffn_hidden_size=100), dict(model_parallel=8, data_parallel=1), "ffn_hidden_size=100"),
    (dict(moe=MoEConfig(num_experts=6, top_k=2)), dict(data_parallel=4, expert_parallel=4), "num_experts=6"),
    (dict(num_layers=2), dict(pipeline_stages=4, micro_batches=4), "num_layers=2"),
])
def test_run_config_checks_degrees_against_the_model(model_kw, par_kw, needle):
    base = dict(arch="gpt", vocab_size=64, hidden_size=64, num_heads=8, ffn_hidden_size=128)
    base.update(model_kw)
    par = dict(mode="semi_auto_parallel")
    par.update(par_kw)
    with pytest.raises(ConfigError, match=needle):
        RunConfig(model=ModelConfig(**base), parallel=ParallelConfig(**par), train=TrainConfig(batch_size=16))
