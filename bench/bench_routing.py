"""Fused MoE routing (one C++ aot pass) vs the composite router ops, on this CPU.

The routing op alone: router probabilities ``probs (G, T, E)`` float32 in, top-k + GShard capacity positions + the
expert slot tables out (``ms_llm.kernels.moe_routing``: ``make_moe_routing('fused' | 'reference', E, k,
normalize=k > 1)``). Tokens N in {4096, 8192, 16384} (one routing group of N tokens by default, the cumulative
count spans all of them; ``--group-tokens`` splits them into groups), experts E in {8, 64}, k in {1, 2}, capacity
factor 1.25 (``C = ceil(T * k * 1.25 / E)``). Two passes, GRAPH_MODE:

- ``forward``: all six outputs (expert_index, gates, position, kept, slot_token, slot_weight);
- ``forward+backward``: the gradient w.r.t. ``probs`` of ``sum(slot_weight * w)`` (the combine weights' backward;
  the integer routing has no gradient).

Before timing, each case checks that both implementations return identical routing. Then both run back to back
in every repeat (after compilation and two warm-up calls) and the reported ratio is the median of the per-repeat
ratios composite / fused, so slow drifts of the shared machine's load cancel out; times are medians.

    python bench/bench_routing.py            # ~1-2 min; writes bench/results/routing.json and routing.md
    python bench/bench_routing.py --tokens 4096 --experts 8 --repeats 5
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mindspore as ms                                                        # noqa: E402
from mindspore import Tensor, nn, ops                                          # noqa: E402

from ms_llm.kernels.moe_routing import MOE_ROUTING_FIELDS, make_moe_routing   # noqa: E402

CAPACITY_FACTOR = 1.25


class Forward(nn.Cell):
    def __init__(self, routing, capacity):
        super().__init__()
        self.routing = routing
        self.capacity = capacity

    def construct(self, probs):
        return self.routing(probs, self.capacity)


class CombineLoss(nn.Cell):
    def __init__(self, routing, capacity):
        super().__init__()
        self.routing = routing
        self.capacity = capacity

    def construct(self, probs, w):
        return ops.sum(self.routing(probs, self.capacity)[5] * w)


class ForwardBackward(nn.Cell):
    def __init__(self, routing, capacity):
        super().__init__()
        self.loss = CombineLoss(routing, capacity)
        self.grad = ops.GradOperation()

    def construct(self, probs, w):
        return self.grad(self.loss)(probs, w)


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    out = fn(*args)
    (out[0] if isinstance(out, tuple) else out).asnumpy()                     # wait for the result
    return time.perf_counter() - t0


def bench_case(tokens: int, experts: int, k: int, group_tokens: int, repeats: int, rng) -> dict:
    g = tokens // group_tokens
    t = group_tokens
    capacity = min(t, math.ceil(round(t * k * CAPACITY_FACTOR / experts, 9)))
    logits = rng.normal(size=(g, t, experts))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs = Tensor((probs / probs.sum(-1, keepdims=True)).astype(np.float32))
    w = Tensor(rng.normal(size=(g, experts, capacity)).astype(np.float32))
    nets = {}
    for impl in ("reference", "fused"):
        nets[("forward", impl)] = (Forward(make_moe_routing(impl, experts, k, k > 1), capacity), (probs,))
        nets[("forward+backward", impl)] = (ForwardBackward(make_moe_routing(impl, experts, k, k > 1), capacity),
                                            (probs, w))
    outs = {impl: nets[("forward", impl)][0](probs) for impl in ("reference", "fused")}
    for name, a, b in zip(MOE_ROUTING_FIELDS, outs["reference"], outs["fused"]):
        assert np.array_equal(a.asnumpy(), b.asnumpy()), f"fused and composite differ on {name}"
    kept = outs["fused"][3].asnumpy()
    grads = [nets[("forward+backward", impl)][0](probs, w).asnumpy() for impl in ("reference", "fused")]
    assert np.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7), "fused and composite gradients differ"
    for net, args in nets.values():                                           # compiled above; two warm-ups
        timed(net, *args)
        timed(net, *args)
    samples = {key: [] for key in nets}
    for _ in range(repeats):                                                  # back to back: same machine load
        for key, (net, args) in nets.items():
            samples[key].append(timed(net, *args))
    row = {"tokens": tokens, "groups": g, "tokens_per_group": t, "experts": experts, "top_k": k,
           "capacity": capacity, "dropped_fraction": float(1.0 - kept.mean()), "repeats": repeats}
    for pass_name in ("forward", "forward+backward"):
        ref, fused = samples[(pass_name, "reference")], samples[(pass_name, "fused")]
        row[f"{pass_name}_composite_ms"] = 1e3 * statistics.median(ref)
        row[f"{pass_name}_fused_ms"] = 1e3 * statistics.median(fused)
        row[f"{pass_name}_speedup"] = statistics.median(a / b for a, b in zip(ref, fused))
    return row


def markdown(result: dict) -> str:
    lines = ["# MoE routing: fused (C++ aot) vs composite ops",
             "",
             f"probs (G, T, E) float32 -> top-k, GShard capacity positions (factor {CAPACITY_FACTOR}), slot tables; "
             f"GRAPH_MODE, CPU ({result['machine']}, load average {result['load_average_1min']:.1f} at the end), "
             f"MindSpore {result['mindspore']}. Median of {result['repeats']} paired repeats; speedup = median of "
             f"per-repeat composite / fused. forward+backward = gradient of sum(slot_weight * w) w.r.t. probs.",
             "",
             "| tokens | groups x tokens | experts | k | capacity | dropped | fwd composite ms | fwd fused ms | "
             "fwd speedup | fwd+bwd composite ms | fwd+bwd fused ms | fwd+bwd speedup |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['tokens']} | {r['groups']} x {r['tokens_per_group']} | {r['experts']} | {r['top_k']} | "
            f"{r['capacity']} | {100 * r['dropped_fraction']:.1f}% | {r['forward_composite_ms']:.2f} | "
            f"{r['forward_fused_ms']:.2f} | {r['forward_speedup']:.1f}x | "
            f"{r['forward+backward_composite_ms']:.2f} | {r['forward+backward_fused_ms']:.2f} | "
            f"{r['forward+backward_speedup']:.1f}x |")
    speedups = [r[f"{p}_speedup"] for r in result["rows"] for p in ("forward", "forward+backward")]
    lines += ["", f"Smallest speedup: {min(speedups):.1f}x (target: at least 2x)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    p.add_argument("--top-k", type=int, nargs="+", default=[1, 2])
    p.add_argument("--group-tokens", type=int, default=0, help="tokens per routing group (0 = one group of all)")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "routing.json"))
    args = p.parse_args()
    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    rng = np.random.default_rng(0)
    rows = []
    start = time.perf_counter()
    for n in args.tokens:
        group = args.group_tokens or n
        if n % group:
            raise SystemExit(f"--group-tokens {group} does not divide --tokens {n}")
        for e in args.experts:
            for k in args.top_k:
                row = bench_case(n, e, k, group, args.repeats, rng)
                rows.append(row)
                print(f"N={n} E={e} k={k}: forward {row['forward_composite_ms']:.2f} / {row['forward_fused_ms']:.2f}"
                      f" ms ({row['forward_speedup']:.1f}x), forward+backward "
                      f"{row['forward+backward_composite_ms']:.2f} / {row['forward+backward_fused_ms']:.2f} ms "
                      f"({row['forward+backward_speedup']:.1f}x)", flush=True)
    result = {"benchmark": "moe_routing_fused_vs_composite", "dtype": "float32", "capacity_factor": CAPACITY_FACTOR,
              "mindspore": ms.__version__, "machine": f"{platform.machine()} {os.cpu_count()} cores",
              "load_average_1min": os.getloadavg()[0], "repeats": args.repeats,
              "wall_seconds": time.perf_counter() - start, "rows": rows}
    md = markdown(result)
    print()
    print(md)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    for path, text in ((args.out, json.dumps(result, indent=2)), (os.path.splitext(args.out)[0] + ".md", md)):
        tmp = path + ".tmp"
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    print(f"wrote {args.out} and {os.path.splitext(args.out)[0]}.md")


if __name__ == "__main__":
    main()
