"""Enumerate the layouts of N devices and rank the feasible ones by predicted step time."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence

from .costs import RECOMPUTE
from .devices import DeviceSpec
from .layout import Layout, structural_problems
from .memory import memory_breakdown
from .shape import ModelShape
from .timing import LayoutPlan, evaluate

DEFAULT_MICRO_BATCH_SIZES = (1, 2, 4, 8)


def divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class SearchResult:
    plans: List[LayoutPlan]                      # feasible, fastest first
    evaluated: int                               # candidates examined (a batch-indivisible dp x mbs counts once)
    rejected: Counter = field(default_factory=Counter)  # reason -> count


def _choices(fixed, default: Iterable) -> list:
    return [fixed] if fixed is not None else list(default)


def search_layouts(shape: ModelShape, devices: int, device: DeviceSpec, global_batch: int, *,
                   dp: Optional[int] = None, tp: Optional[int] = None, pp: Optional[int] = None,
                   ep: Optional[int] = None, micro_batch_size: Optional[int] = None,
                   recompute: Optional[str] = None, optimizer_sharding: Optional[bool] = None,
                   dtype: Optional[str] = None, sequence_parallel: bool = False,
                   micro_batch_sizes: Sequence[int] = DEFAULT_MICRO_BATCH_SIZES,
                   train_tokens: Optional[float] = None, memory_reserve: float = 0.08) -> SearchResult:
    """All layouts with ``dp * tp * pp == devices`` (fixed options held), feasible ones ranked by step time.

    Feasible: tp divides the heads (query and key/value) and FFN width and fits in a node, pp divides the
    layers, the global batch splits into whole micro-batches with at least pp of them, ep divides the experts
    and dp, and the largest stage fits device memory (HBM minus ``memory_reserve``).
    """
    if devices < 1:
        raise ValueError(f"devices: must be >= 1, got {devices}")
    if global_batch < 1:
        raise ValueError(f"global_batch: must be >= 1, got {global_batch}")
    if recompute is not None and recompute not in RECOMPUTE:
        raise ValueError(f"recompute: '{recompute}' is not one of {list(RECOMPUTE)}")
    for name, v in (("dp", dp), ("tp", tp), ("pp", pp), ("ep", ep), ("micro_batch_size", micro_batch_size)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name}: must be an integer >= 1, got {v!r}")
    fixed = [v for v in (dp, tp, pp) if v is not None]
    prod = 1
    for v in fixed:
        prod *= v
    if devices % prod or (len(fixed) == 3 and prod != devices):
        raise ValueError(f"dp/tp/pp: fixed degrees {dict(dp=dp, tp=tp, pp=pp)} do not multiply into "
                         f"{devices} devices")
    if dtype is None:
        dtype = "bf16" if device.peak_tflops.get("bf16") else "fp16"

    result = SearchResult(plans=[], evaluated=0)
    tps = _choices(tp, [t for t in divisors(devices) if t <= device.devices_per_node])
    for t in tps:
        for p in _choices(pp, divisors(devices // t) if devices % t == 0 else []):
            if devices % (t * p):
                continue
            d = devices // (t * p)
            if dp is not None and d != dp:
                continue
            for b in _choices(micro_batch_size, micro_batch_sizes):
                if global_batch % (d * b):
                    result.evaluated += 1
                    result.rejected[f"global_batch={global_batch} is not a multiple of dp*micro_batch_size"] += 1
                    continue
                m = global_batch // (d * b)
                eps = _choices(ep, [e for e in divisors(d) if shape.num_experts and shape.num_experts % e == 0]
                               if shape.num_experts else [1])
                zeros = _choices(optimizer_sharding, [False, True] if d > 1 or shape.num_experts else [False])
                for e in eps:
                    for rc in _choices(recompute, RECOMPUTE):
                        for z in zeros:
                            result.evaluated += 1
                            layout = Layout(dp=d, tp=t, pp=p, ep=e, micro_batch_size=b, num_micro_batches=m,
                                            optimizer_sharding=z, recompute=rc, dtype=dtype,
                                            sequence_parallel=sequence_parallel and t > 1)
                            problems = structural_problems(shape, layout, device)
                            if problems:
                                for msg in problems:
                                    result.rejected[msg] += 1
                                continue
                            mem = memory_breakdown(shape, layout, device, memory_reserve)
                            if not mem.fits:
                                result.rejected[f"exceeds {device.name} memory "
                                                f"({device.hbm_gib:g} GiB less {memory_reserve:.0%} reserve)"] += 1
                                continue
                            result.plans.append(evaluate(shape, layout, device, train_tokens, memory_reserve))
    result.plans.sort(key=lambda pl: (pl.step_seconds, pl.memory.total))
    return result
