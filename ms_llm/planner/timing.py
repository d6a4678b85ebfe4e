"""Step time of a layout and the training-time formula, with every efficiency factor reported.

Per pipeline stage i and micro-batch (1F1B, Narayanan et al. 2021 section 2.2):
    compute_i = stage FLOPs per device / (peak x matmul_efficiency)
    stage_i   = compute_i + TP + EP + PP communication of one micro-batch (not overlapped)
    pipeline  = (m + p - 1) x max_i stage_i                  (bubble fraction (p-1)/m)
    step      = pipeline + DP gradient all-reduce + optimizer update (HBM-bound Adam)

The step time factors exactly into

    step = FLOPs_step / (peak x N x E),  E = matmul_eff x f_imbalance x f_comm x f_bubble x f_tail

with  f_imbalance = mean_i compute_i / max_i compute_i   (embedding / LM head on the end stages)
      f_comm      = max_i compute_i / max_i stage_i       (micro-batch communication on the critical path)
      f_bubble    = m / (m + p - 1)                        (= 1 / (1 + (p-1)/m))
      f_tail      = pipeline / step                        (DP all-reduce and optimizer after the flush)
so training time = tokens x FLOPs/token / (peak x N x E), the formula the report prints with its numbers.
FLOPs here are hardware FLOPs (recomputation included, Megatron's accounting); MFU uses model FLOPs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Optional

from .comm import CommItem, comm_per_stage, comm_summary
from .costs import StepFlops, head_flops_per_token, step_flops
from .devices import DeviceSpec
from .layout import Layout, structural_problems
from .memory import STATE_BYTES, MemoryBreakdown, memory_breakdown, stage_params, stage_slices
from .shape import ModelShape

SECONDS_PER_DAY = 86400.0


@dataclass(frozen=True)
class Factors:
    matmul_efficiency: float  # device constant (devices.yaml)
    imbalance: float          # mean / max stage compute
    communication: float      # max stage compute / max stage time (TP + EP + PP inside micro-batches)
    bubble: float             # m / (m + p - 1)
    tail: float               # pipeline time / step time (DP all-reduce + optimizer update)
    bubble_fraction: float    # (p - 1) / m, Narayanan et al.'s bubble time fraction

    @property
    def parallel(self) -> float:
        """Parallel efficiency: everything but the device's kernel efficiency."""
        return self.imbalance * self.communication * self.bubble * self.tail

    @property
    def total(self) -> float:
        return self.matmul_efficiency * self.parallel

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(parallel=self.parallel, total=self.total)
        return d


@dataclass(frozen=True)
class LayoutPlan:
    layout: Layout
    memory: MemoryBreakdown
    comm: Dict[str, CommItem]
    flops: StepFlops
    factors: Factors
    peak_flops: float         # per device, FLOP/s for layout.dtype
    compute_seconds: float    # max stage compute per micro-batch
    stage_seconds: float      # max stage time per micro-batch (compute + communication)
    pipeline_seconds: float
    dp_seconds: float
    optimizer_seconds: float
    step_seconds: float
    achieved_tflops: float    # hardware FLOPs / (step x devices), per device
    mfu: float                # model FLOPs / (step x devices x peak)
    tokens_per_second: float
    train_tokens: Optional[float]
    train_seconds: Optional[float]

    @property
    def fits(self) -> bool:
        return self.memory.fits

    @property
    def devices(self) -> int:
        return self.layout.devices

    def training_time_formula(self, tokens: Optional[float] = None) -> str:
        """``time = data x per-step compute / (device rate x devices x efficiency)`` with numbers filled in."""
        tokens = tokens if tokens is not None else (self.train_tokens or 1e9)
        per_token = self.flops.hardware / self.flops.tokens
        seconds = tokens * per_token / (self.peak_flops * self.devices * self.factors.total)
        f = self.factors
        return (f"time = data x FLOPs/token / (device rate x devices x efficiency)\n"
                f"     = {tokens:.3g} tokens x {per_token:.4g} FLOP/token / "
                f"({self.peak_flops / 1e12:.4g} TFLOP/s x {self.devices} x {f.total:.3f})\n"
                f"     = {seconds:.4g} s = {seconds / SECONDS_PER_DAY:.2f} days\n"
                f"  efficiency {f.total:.3f} = matmul {f.matmul_efficiency:.3f} x imbalance {f.imbalance:.3f} x "
                f"communication {f.communication:.3f} x bubble {f.bubble:.3f} (bubble fraction "
                f"{f.bubble_fraction:.3f}) x tail {f.tail:.3f}")

    def to_dict(self) -> dict:
        return {
            "layout": self.layout.to_dict(), "label": self.layout.label(), "fits": self.fits,
            "memory": self.memory.to_dict(), "comm": {k: v.to_dict() for k, v in self.comm.items()},
            "flops": asdict(self.flops), "factors": self.factors.to_dict(), "peak_flops": self.peak_flops,
            "compute_seconds": self.compute_seconds, "stage_seconds": self.stage_seconds,
            "pipeline_seconds": self.pipeline_seconds, "dp_seconds": self.dp_seconds,
            "optimizer_seconds": self.optimizer_seconds, "step_seconds": self.step_seconds,
            "achieved_tflops": self.achieved_tflops, "mfu": self.mfu,
            "tokens_per_second": self.tokens_per_second, "train_tokens": self.train_tokens,
            "train_seconds": self.train_seconds,
            "train_days": None if self.train_seconds is None else self.train_seconds / SECONDS_PER_DAY,
            "formula": self.training_time_formula(),
        }


def stage_compute_flops(shape: ModelShape, layout: Layout) -> list:
    """Hardware FLOPs one device of each stage runs per micro-batch (forward + backward + recompute)."""
    tokens = shape.seq_length * layout.micro_batch_size
    out = []
    for i, layers in enumerate(stage_slices(shape, layout.pp)):
        per_token = 0.0
        for sp in layers:
            extra = {"none": 0.0, "selective": sp.score_flops, "full": sp.fwd_flops}[layout.recompute]
            per_token += 3.0 * sp.fwd_flops + extra
        if i == layout.pp - 1:
            per_token += 3.0 * head_flops_per_token(shape)
        out.append(per_token * tokens / layout.tp)
    return out


def optimizer_seconds(shape: ModelShape, layout: Layout, device: DeviceSpec) -> float:
    """Adam update, HBM-bound: each updated parameter reads/writes master, m, v (4 B each, twice), reads its
    gradient and writes its low-precision weight (ZeRO-1 updates 1/replicas of them)."""
    w_b, g_b, _ = STATE_BYTES[layout.dtype]
    per_param = 24.0 + g_b + (w_b if layout.dtype != "fp32" else 0.0)
    worst = 0.0
    for i, layers in enumerate(stage_slices(shape, layout.pp)):
        sp = stage_params(shape, layout, i, layers)
        n = sp.dense / layout.dp + sp.expert / layout.expert_replicas if layout.optimizer_sharding else sp.total
        worst = max(worst, n * per_param / (device.hbm_bandwidth_gbs * 1e9))
    return worst


def evaluate(shape: ModelShape, layout: Layout, device: DeviceSpec, train_tokens: Optional[float] = None,
             memory_reserve: float = 0.08) -> LayoutPlan:
    """Memory, communication and time of ``layout``; raises ValueError if it cannot run structurally."""
    problems = structural_problems(shape, layout, device)
    if problems:
        raise ValueError(f"layout {layout.label()}: " + "; ".join(problems))
    peak = device.peak_flops(layout.dtype)
    eff = device.matmul_efficiency
    flops = step_flops(shape, layout.global_batch, layout.recompute)
    mem = memory_breakdown(shape, layout, device, memory_reserve)
    per_stage_comm = comm_per_stage(shape, layout, device)
    comm = comm_summary(per_stage_comm)

    compute = [f / (peak * eff) for f in stage_compute_flops(shape, layout)]
    stage = [c + st["tp"].per_micro_batch_seconds + st["ep"].per_micro_batch_seconds +
             st["pp"].per_micro_batch_seconds for c, st in zip(compute, per_stage_comm)]
    m, p = layout.num_micro_batches, layout.pp
    pipeline = (m + p - 1) * max(stage)
    dp = max(st["dp"].seconds_per_step for st in per_stage_comm)
    opt = optimizer_seconds(shape, layout, device)
    step = pipeline + dp + opt

    mean_c = sum(compute) / len(compute)
    factors = Factors(matmul_efficiency=eff, imbalance=mean_c / max(compute),
                      communication=max(compute) / max(stage), bubble=m / (m + p - 1),
                      tail=pipeline / step, bubble_fraction=(p - 1) / m)
    n = layout.devices
    train_seconds = None if train_tokens is None else train_tokens / flops.tokens * step
    return LayoutPlan(
        layout=layout, memory=mem, comm=comm, flops=flops, factors=factors, peak_flops=peak,
        compute_seconds=max(compute), stage_seconds=max(stage), pipeline_seconds=pipeline, dp_seconds=dp,
        optimizer_seconds=opt, step_seconds=step, achieved_tflops=flops.hardware / (step * n) / 1e12,
        mfu=flops.model / (step * n * peak), tokens_per_second=flops.tokens / step,
        train_tokens=train_tokens, train_seconds=train_seconds)
