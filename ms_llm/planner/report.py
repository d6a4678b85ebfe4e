"""run_plan: the planner's entry point (for ``ms-llm plan``), its report, text table and JSON form."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

from .costs import forward_flops_per_token, param_counts
from .devices import get_device
from .search import DEFAULT_MICRO_BATCH_SIZES, search_layouts
from .shape import ModelShape, as_shape
from .timing import SECONDS_PER_DAY, LayoutPlan

GIB = 2.0 ** 30


@dataclass
class PlanReport:
    shape: ModelShape
    device: object                      # DeviceSpec
    devices: int
    global_batch: int
    train_tokens: Optional[float]
    plans: List[LayoutPlan]             # the top feasible layouts, fastest first
    feasible: int
    evaluated: int
    rejected: Dict[str, int] = field(default_factory=dict)

    @property
    def best(self) -> Optional[LayoutPlan]:
        return self.plans[0] if self.plans else None

    def model_summary(self) -> dict:
        pc = param_counts(self.shape)
        f = forward_flops_per_token(self.shape)
        return {"params_total": pc.total, "params_activated": pc.activated, "params_embedding": pc.embedding,
                "params_experts": pc.experts, "forward_flops_per_token": f["total"],
                "train_flops_per_token_6n": 6.0 * pc.activated,
                "train_flops_per_token_no_recompute": 3.0 * f["total"]}

    def to_dict(self) -> dict:
        """JSON-serialisable form (floats, ints, strings, lists, dicts only)."""
        dev = self.device
        return {
            "model": {"shape": asdict(self.shape), **self.model_summary()},
            "device": {"name": dev.name, "description": dev.description, "calibrated": dev.calibrated,
                       "peak_tflops": dev.peak_tflops, "hbm_gib": dev.hbm_gib,
                       "hbm_bandwidth_gbs": dev.hbm_bandwidth_gbs, "devices_per_node": dev.devices_per_node,
                       "intra_node_group": dev.intra_node_group,
                       "intra_node_bandwidth_gbs": dev.intra_node_bandwidth_gbs,
                       "cross_group_bandwidth_gbs": dev.cross_group_bandwidth_gbs,
                       "inter_node_bandwidth_gbs": dev.inter_node_bandwidth_gbs,
                       "matmul_efficiency": dev.matmul_efficiency, "sources": dict(dev.sources)},
            "devices": self.devices, "global_batch": self.global_batch, "seq_length": self.shape.seq_length,
            "train_tokens": self.train_tokens, "feasible": self.feasible, "evaluated": self.evaluated,
            "rejected": dict(self.rejected), "plans": [p.to_dict() for p in self.plans],
        }


def run_plan(model, seq_length: Optional[int], global_batch: int, devices: int, device_type, top: int = 5, *,
             train_tokens: Optional[float] = None, memory_reserve: float = 0.08,
             dp: Optional[int] = None, tp: Optional[int] = None, pp: Optional[int] = None,
             ep: Optional[int] = None, micro_batch_size: Optional[int] = None, recompute: Optional[str] = None,
             optimizer_sharding: Optional[bool] = None, dtype: Optional[str] = None,
             sequence_parallel: bool = False,
             micro_batch_sizes: Sequence[int] = DEFAULT_MICRO_BATCH_SIZES) -> PlanReport:
    """Plan training of ``model`` (a ModelConfig-like object or a ModelShape) on ``devices`` devices.

    Layout options given (dp, tp, pp, ep, micro_batch_size, recompute, optimizer_sharding, dtype,
    sequence_parallel) are held fixed; the others are enumerated. ``train_tokens`` (e.g. 300e9) adds the
    end-to-end training time; ``memory_reserve`` is the fraction of HBM kept free for workspace and
    fragmentation (0.08: MindFormers' Atlas 800T A2 configs cap max_device_memory at 59GB of 64 GiB).
    """
    shape = as_shape(model, seq_length)
    device = get_device(device_type)
    if top < 1:
        raise ValueError(f"top: must be >= 1, got {top}")
    if train_tokens is not None and train_tokens <= 0:
        raise ValueError(f"train_tokens: must be > 0, got {train_tokens}")
    res = search_layouts(shape, devices, device, global_batch, dp=dp, tp=tp, pp=pp, ep=ep,
                         micro_batch_size=micro_batch_size, recompute=recompute,
                         optimizer_sharding=optimizer_sharding, dtype=dtype, sequence_parallel=sequence_parallel,
                         micro_batch_sizes=micro_batch_sizes, train_tokens=train_tokens,
                         memory_reserve=memory_reserve)
    return PlanReport(shape=shape, device=device, devices=devices, global_batch=global_batch,
                      train_tokens=train_tokens, plans=res.plans[:top], feasible=len(res.plans),
                      evaluated=res.evaluated, rejected=dict(res.rejected.most_common()))


def plan_for_run(run_cfg, devices: int, device_type, top: int = 5, **options) -> PlanReport:
    """run_plan for a RunConfig-like object: ``model``, ``data.seq_length`` and ``train.batch_size`` (global).

    The parallel section is not imposed (the planner chooses it); pass layout options to hold any fixed.
    """
    for path in ("model", "data", "train"):
        if not hasattr(run_cfg, path):
            raise ValueError(f"run config: missing section '{path}' (got {type(run_cfg).__name__})")
    return run_plan(run_cfg.model, run_cfg.data.seq_length, run_cfg.train.batch_size, devices, device_type,
                    top, **options)


def _fmt_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def _fmt_time(seconds: float) -> str:
    if seconds >= SECONDS_PER_DAY:
        return f"{seconds / SECONDS_PER_DAY:.1f} d"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.3g} s"


def format_report(report: PlanReport) -> str:
    """A readable text report: model and device summary, the ranked table, details of the best layout."""
    s, dev = report.shape, report.device
    ms = report.model_summary()
    lines = [
        f"ms-llm plan: {s.arch} h={s.hidden_size} layers={s.num_layers}"
        + (f"+{s.num_decoder_layers}" if s.num_decoder_layers else "")
        + f" heads={s.num_heads} ffn={s.ffn_hidden_size} vocab={s.vocab_size} seq={s.seq_length}"
        + (f" experts={s.num_experts} top{s.top_k} every {s.moe_every}" if s.num_experts else ""),
        f"  params {_fmt_count(ms['params_total'])} (activated per token {_fmt_count(ms['params_activated'])}); "
        f"train FLOPs/token {ms['train_flops_per_token_no_recompute']:.4g} counted "
        f"(6N approximation {ms['train_flops_per_token_6n']:.4g})",
        f"  device {dev.name}: peak TFLOPS "
        + " / ".join(f"{k} {v:g}" for k, v in dev.peak_tflops.items() if v) + f", {dev.hbm_gib:g} GiB, links "
        f"{dev.intra_node_bandwidth_gbs:g}/{dev.inter_node_bandwidth_gbs:g} GB/s intra/inter, "
        f"{dev.devices_per_node} per node; matmul efficiency {dev.matmul_efficiency:.2f} "
        f"({'calibrated' if dev.calibrated else 'NOT calibrated: assumed'})",
        f"  {report.devices} devices, global batch {report.global_batch} "
        f"({report.global_batch * s.seq_length:,} tokens/step); {report.feasible} feasible of "
        f"{report.evaluated} candidates"
        + ("" if report.train_tokens else "; 'train' = time per 1e9 tokens (pass train_tokens for a total)"),
    ]
    if not report.plans:
        lines.append("  no feasible layout. Rejections:")
        for reason, n in list(report.rejected.items())[:8]:
            lines.append(f"    {n:6d} x {reason}")
        return "\n".join(lines)

    hdr = (f"{'#':>2} {'dp':>4} {'tp':>3} {'pp':>3} {'ep':>3} {'mbs x m':>9} {'recomp':>9} {'zero1':>5} "
           f"{'mem GiB':>8} {'step s':>8} {'TFLOPS':>7} {'MFU':>5} {'eff':>5} {'bubble':>6} "
           f"{'tp s':>6} {'pp s':>6} {'ep s':>6} {'dp s':>6} {'train':>8}")
    lines += ["", hdr, "-" * len(hdr)]
    for i, p in enumerate(report.plans, 1):
        L = p.layout
        train = _fmt_time(p.train_seconds) if p.train_seconds is not None else \
            _fmt_time(1e9 / p.tokens_per_second)
        lines.append(
            f"{i:>2} {L.dp:>4} {L.tp:>3} {L.pp:>3} {L.ep:>3} {f'{L.micro_batch_size}x{L.num_micro_batches}':>9} "
            f"{L.recompute:>9} {('yes' if L.optimizer_sharding else 'no'):>5} "
            f"{p.memory.total / GIB:>8.1f} {p.step_seconds:>8.3g} {p.achieved_tflops:>7.1f} {p.mfu:>5.2f} "
            f"{p.factors.total:>5.3f} {p.factors.bubble_fraction:>6.3f} "
            f"{p.comm['tp'].seconds_per_step:>6.3g} {p.comm['pp'].seconds_per_step:>6.3g} "
            f"{p.comm['ep'].seconds_per_step:>6.3g} {p.comm['dp'].seconds_per_step:>6.3g} {train:>8}")

    b = report.best
    m = b.memory
    lines += ["", f"best: {b.layout.label()} ({b.layout.dtype})",
              "  " + b.training_time_formula().replace("\n", "\n  "),
              f"  step {b.step_seconds:.4g} s = pipeline {b.pipeline_seconds:.4g} s "
              f"[(m + p - 1) x stage {b.stage_seconds:.4g} s, compute {b.compute_seconds:.4g} s] + "
              f"DP all-reduce {b.dp_seconds:.4g} s + optimizer {b.optimizer_seconds:.4g} s",
              f"  memory (stage {m.stage}, {m.inflight_micro_batches} micro-batches in flight): weights "
              f"{m.weights / GIB:.2f} + grads {m.gradients / GIB:.2f} + optimizer {m.optimizer / GIB:.2f} + "
              f"activations {m.activations / GIB:.2f} + recompute {m.recompute_working / GIB:.2f} + logits "
              f"{m.logits / GIB:.2f} = {m.total / GIB:.2f} GiB of {m.capacity / GIB:.1f} usable",
              "  communication per step per device:"]
    for dim in ("tp", "pp", "ep", "dp"):
        c = b.comm[dim]
        if c.bytes_per_step:
            lines.append(f"    {dim}: group {c.group_size} over {c.link} at {c.bandwidth_gbs:g} GB/s: "
                         f"{c.bytes_per_step / 1e9:.3g} GB, {c.seconds_per_step:.3g} s")
    return "\n".join(lines)
