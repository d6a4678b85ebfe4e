"""Every parallel knob, in one section (`parallel:` in YAML)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .base import check, check_choice

MODES = ("stand_alone", "data_parallel", "semi_auto_parallel", "auto_parallel")
SEARCH_MODES = ("sharding_propagation", "recursive_programming", "dynamic_programming")
RECOMPUTE = ("none", "selective", "full")
EXPERT_EXCHANGE = ("auto", "alltoall", "allgather")


@dataclass(frozen=True)
class ParallelConfig:
    mode: str = "stand_alone"             # stand_alone | data_parallel | semi_auto_parallel | auto_parallel
    data_parallel: int = 1                # dp: batch split across this many replicas
    model_parallel: int = 1               # mp/tp: heads, FFN width and vocabulary split (operator parallel)
    pipeline_stages: int = 1              # pp: layers split into this many stages
    expert_parallel: int = 1              # ep: experts split across this many devices (divides dp: an expert
                                          # group is ep data-parallel ranks; mp still splits each expert's FFN)
    micro_batches: int = 1                # pipeline micro-batches per step (>= pipeline_stages to fill the pipe)
    micro_batch_interleave: int = 1       # split each micro-batch in n to overlap compute with model-parallel
                                          # communication (MindSpore MicroBatchInterleaved; 1 = off; semi-auto)
    optimizer_shard: bool = False         # shard optimizer states across data-parallel ranks (ZeRO-1)
    recompute: str = "none"               # activation recomputation: none | selective (attention) | full (layer)
    vocab_parallel: bool = True           # split embedding/output over the vocabulary axis when mp > 1
    search_mode: str = "sharding_propagation"  # auto_parallel strategy search algorithm
    expert_exchange: str = "auto"         # data-parallel MoE token exchange: alltoall (HCCL) | allgather | auto
    gradient_accumulation_shard: bool = False  # keep accumulated gradients sharded (pipeline + optimizer shard)
    device_num: Optional[int] = None      # devices expected; None = product of the degrees
    strategy_ckpt_save_file: str = ""     # where MindSpore writes the parallel strategy (beside checkpoints)

    def __post_init__(self):
        k = "parallel"
        check_choice(self.mode, f"{k}.mode", MODES)
        check_choice(self.search_mode, f"{k}.search_mode", SEARCH_MODES)
        check_choice(self.recompute, f"{k}.recompute", RECOMPUTE)
        check_choice(self.expert_exchange, f"{k}.expert_exchange", EXPERT_EXCHANGE)
        for name in ("data_parallel", "model_parallel", "pipeline_stages", "expert_parallel", "micro_batches",
                     "micro_batch_interleave"):
            check(getattr(self, name) >= 1, f"{k}.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.pipeline_stages > 1:
            check(self.micro_batches >= self.pipeline_stages, f"{k}.micro_batches",
                  f"{self.micro_batches} < pipeline_stages={self.pipeline_stages} leaves the pipeline idle")
        check(self.data_parallel % self.expert_parallel == 0, f"{k}.expert_parallel",
              f"{self.expert_parallel} must divide data_parallel={self.data_parallel} (experts are spread over "
              f"data-parallel ranks; model_parallel splits each expert's feed-forward)")
        if self.micro_batch_interleave > 1:
            check(self.mode in ("semi_auto_parallel", "auto_parallel"), f"{k}.micro_batch_interleave",
                  "overlaps model-parallel communication; it needs semi_auto_parallel or auto_parallel")
        if self.device_num is not None:
            check(self.device_num == self.world_size, f"{k}.device_num",
                  f"{self.device_num} != data_parallel*model_parallel*pipeline_stages = {self.world_size}")
        if self.mode == "stand_alone":
            check(self.world_size == 1, f"{k}.mode",
                  f"stand_alone needs all degrees 1 (product {self.world_size}); pick data_parallel or semi_auto_parallel")
        if self.mode == "data_parallel":
            check(self.model_parallel == 1 and self.pipeline_stages == 1, f"{k}.mode",
                  "data_parallel mode has no model_parallel/pipeline_stages; use semi_auto_parallel")

    @property
    def world_size(self) -> int:
        return self.data_parallel * self.model_parallel * self.pipeline_stages
