"""The one place that talks to MindSpore's parallel context: ``set_auto_parallel_context``, ``init`` and groups.

``setup(parallel_cfg)`` refuses, before anything is compiled, what the device cannot do (MindSpore 2.10 on CPU runs
only stand-alone and data-parallel jobs: no semi-auto/auto parallel, no pipeline, no dry-run, no AlltoAll), starts
the communication when the job has more than one process, checks that the process count matches the configured
degrees, maps the config onto MindSpore's auto-parallel context and creates the expert-parallel groups.
The mapping itself is :func:`auto_parallel_kwargs`, plain data, so tests read it without a device.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from .expert_exchange import ExpertGroup, expert_data_ranks, expert_group, group_ranks, resolve_impl

DEVICES = ("CPU", "Ascend", "GPU")
STRATEGY_FILE = "strategy.ckpt"   # name of the strategy file MindSpore writes beside the checkpoints


class ParallelUnsupportedError(ValueError):
    """The configured parallel layout cannot run on this device; the message says what it needs."""


@dataclass(frozen=True)
class ParallelInfo:
    """What a process needs to know about the job after :func:`setup`."""
    mode: str                      # parallel.mode actually set
    device_target: str             # CPU | Ascend | GPU
    rank: int                      # global rank of this process
    world_size: int                # processes in the job
    data_parallel: int = 1
    model_parallel: int = 1
    pipeline_stages: int = 1
    expert_parallel: int = 1
    expert_exchange: str = "allgather"     # resolved data-parallel MoE exchange: alltoall | allgather
    expert_group: Optional[ExpertGroup] = None  # this rank's expert-parallel group (data_parallel mode, ep > 1)
    expert_data_group: str = ""    # group of the ranks holding the same experts ('' if ep = 1 or ep = world)
    strategy_file: str = ""        # where MindSpore saves the parallel strategy ('' = none)
    dry_run: bool = False          # compiled under MS_SIMULATION_LEVEL (no device execution)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def feeds_full_batch(self) -> bool:
        """Semi-auto / auto parallel feed every rank the global batch (MindSpore slices it by the strategies);
        data parallel feeds each rank its own slice."""
        return self.mode in ("semi_auto_parallel", "auto_parallel")

    def local_batch(self, arrays):
        """This rank's part of a global batch (tuple of arrays with the batch on axis 0)."""
        if self.feeds_full_batch or self.world_size == 1:
            return tuple(arrays)
        n = arrays[0].shape[0]
        if n % self.world_size:
            raise ValueError(f"global batch of {n} cannot be split over {self.world_size} data-parallel ranks")
        m = n // self.world_size
        return tuple(a[self.rank * m:(self.rank + 1) * m] for a in arrays)


def simulation_level() -> Optional[int]:
    """MindSpore's dry-run level (``MS_SIMULATION_LEVEL``, set by scripts/run_distribute.sh --dry-run), or None."""
    level = os.environ.get("MS_SIMULATION_LEVEL", "").strip()
    return int(level) if level else None


def check_supported(cfg, device_target: str, dry_run: bool = False) -> None:
    """Raise :class:`ParallelUnsupportedError` (before any graph exists) for layouts the device cannot run."""
    if device_target not in DEVICES:
        raise ParallelUnsupportedError(f"device_target '{device_target}' is not one of {DEVICES}")
    if device_target != "CPU":
        return
    needs_ascend = []
    if cfg.mode in ("semi_auto_parallel", "auto_parallel"):
        needs_ascend.append(f"parallel.mode={cfg.mode}")
    if cfg.pipeline_stages > 1:
        needs_ascend.append(f"parallel.pipeline_stages={cfg.pipeline_stages}")
    if cfg.optimizer_shard:
        needs_ascend.append("parallel.optimizer_shard=true")
    if dry_run:
        needs_ascend.append("the dry run (MS_SIMULATION_LEVEL)")
    if needs_ascend:
        raise ParallelUnsupportedError(
            f"{', '.join(needs_ascend)} needs an Ascend device (MindSpore 2.10 on CPU runs only stand_alone and "
            f"data_parallel jobs; semi-auto/auto parallel, pipeline stages, optimizer sharding and dry runs are "
            f"refused there). Use parallel.mode=data_parallel on CPU, or run on an Ascend host "
            f"(scripts/run_distribute.sh --device Ascend, or --dry-run on a host with CANN).")
    resolve_impl(cfg.expert_exchange, device_target)


def auto_parallel_kwargs(cfg, device_num: int, strategy_file: str = "") -> dict:
    """Arguments of ``mindspore.set_auto_parallel_context`` for ``cfg`` on ``device_num`` devices."""
    kw = {"parallel_mode": cfg.mode}
    if cfg.mode == "stand_alone":
        return kw
    kw.update(device_num=device_num, gradients_mean=True)
    if cfg.mode == "data_parallel":
        kw["dataset_strategy"] = "data_parallel"      # each rank reads its own slice of the global batch
        return kw
    # semi_auto_parallel / auto_parallel: every rank reads the global batch; strategies slice it
    kw["dataset_strategy"] = "full_batch"
    kw["parameter_broadcast"] = True                  # replicated weights start equal on every rank
    kw["pipeline_stages"] = cfg.pipeline_stages
    kw["enable_parallel_optimizer"] = cfg.optimizer_shard
    if cfg.optimizer_shard:
        # level2 also shards the (accumulated) gradients across data-parallel ranks
        kw["parallel_optimizer_config"] = {"optimizer_level": "level2" if cfg.gradient_accumulation_shard
                                           else "level1"}
    if cfg.expert_parallel > 1:
        kw["enable_alltoall"] = True                  # sharded expert axis exchanges tokens with AlltoAll
    if cfg.mode == "auto_parallel":
        kw["search_mode"] = cfg.search_mode
    if strategy_file:
        kw["strategy_ckpt_config"] = {"save_file": strategy_file, "only_trainable_params": False}
    return kw


def strategy_file_in(directory: str) -> str:
    """Path of the strategy file kept beside the checkpoints of ``directory``."""
    return os.path.join(directory, STRATEGY_FILE)


def launched_processes() -> int:
    """Processes the launcher started (msrun: MS_WORKER_NUM; rank table / dry run: RANK_SIZE), 1 if none."""
    for var in ("MS_WORKER_NUM", "RANK_SIZE"):
        value = os.environ.get(var, "").strip()
        if value:
            return int(value)
    return 1


def check_world(cfg, world_size: int) -> None:
    """The job's process count must equal data_parallel * model_parallel * pipeline_stages."""
    if cfg.mode == "stand_alone":
        if world_size != 1:
            raise ValueError(f"parallel.mode=stand_alone, but the job has {world_size} processes; set "
                             f"parallel.mode=data_parallel and parallel.data_parallel={world_size}")
        return
    if world_size != cfg.world_size:
        raise ValueError(
            f"parallel: data_parallel({cfg.data_parallel}) * model_parallel({cfg.model_parallel}) * "
            f"pipeline_stages({cfg.pipeline_stages}) = {cfg.world_size}, but the job has {world_size} processes "
            f"(msrun --worker_num / RANK_SIZE)")


def setup(cfg, device_target: Optional[str] = None, strategy_file: Optional[str] = None) -> ParallelInfo:
    """Configure MindSpore for ``cfg`` (a ParallelConfig) and start communication when the job is distributed.

    ``strategy_file``: where MindSpore saves the strategy (semi-auto/auto), default ``cfg.strategy_ckpt_save_file``.
    Call once per process, after ``ms.set_device`` and before building any cell that communicates.
    """
    import mindspore as ms

    device_target = device_target or ms.get_context("device_target")
    level = simulation_level()
    check_supported(cfg, device_target, dry_run=level is not None)
    strategy_file = cfg.strategy_ckpt_save_file if strategy_file is None else strategy_file
    ms.reset_auto_parallel_context()
    if cfg.mode == "stand_alone":
        check_world(cfg, launched_processes())
        ms.set_auto_parallel_context(**auto_parallel_kwargs(cfg, 1))
        return ParallelInfo(mode=cfg.mode, device_target=device_target, rank=0, world_size=1,
                            expert_exchange=resolve_impl(cfg.expert_exchange, device_target),
                            dry_run=level is not None)

    from mindspore.communication import GlobalComm, create_group, get_group_size, get_rank, init

    if not GlobalComm.INITED:
        init()
    rank, world = get_rank(), get_group_size()
    check_world(cfg, world)
    if strategy_file and cfg.mode in ("semi_auto_parallel", "auto_parallel"):
        os.makedirs(os.path.dirname(os.path.abspath(strategy_file)), exist_ok=True)
    else:
        strategy_file = ""
    ms.set_auto_parallel_context(**auto_parallel_kwargs(cfg, world, strategy_file))

    impl = resolve_impl(cfg.expert_exchange, device_target)
    group, data_group = None, ""
    if cfg.mode == "data_parallel" and cfg.expert_parallel > 1:
        ep = cfg.expert_parallel
        name = ""
        if impl == "alltoall":
            ranks = group_ranks(world, ep)[rank // ep]
            name = f"expert_parallel_{ranks[0]}"
            create_group(name, ranks)
        group = expert_group(rank, world, ep, name=name, world_group=GlobalComm.WORLD_COMM_GROUP)
        if world > ep:
            data_ranks = expert_data_ranks(world, ep)[rank % ep]
            data_group = f"expert_data_parallel_{data_ranks[0]}"
            create_group(data_group, data_ranks)
    return ParallelInfo(mode=cfg.mode, device_target=device_target, rank=rank, world_size=world,
                        data_parallel=cfg.data_parallel, model_parallel=cfg.model_parallel,
                        pipeline_stages=cfg.pipeline_stages, expert_parallel=cfg.expert_parallel,
                        expert_exchange=impl, expert_group=group, expert_data_group=data_group,
                        strategy_file=strategy_file,
                        dry_run=level is not None)


def reset() -> None:
    """Back to stand-alone (tests; a process that sets up twice)."""
    import mindspore as ms
    ms.reset_auto_parallel_context()
