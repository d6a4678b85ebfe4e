"""Where an MoE layer's forward + backward spends its time, against the dense FFN of equal activated FLOPs:
MindSpore's profiler (CPU activity), op time by op type for both, and the split the MoE / dense ratio comes from:
the batched expert products (``BatchMatMul``) against the dense FFN's products (our OpenBLAS kernel, ``Custom``), and
everything else (router, dispatch, combine, auxiliary losses, activations).

    python bench/profile_moe.py --experts 64 --top-k 1      # bench_moe.py's shapes: 8 x 512 tokens, H 512, F 2048

Writes bench/results/profile_moe_e<E>_k<k>.md. The wall times are medians of paired runs (as in bench_moe.py); the
profiled op times add the profiler's own overhead.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import mindspore as ms                                                        # noqa: E402
from mindspore import Tensor                                                  # noqa: E402

import worker_ms                                                              # noqa: E402
from bench_moe import Backward, layer_config, run_once                        # noqa: E402
from ms_llm.layers.mlp import FeedForward                                     # noqa: E402
from ms_llm.moe import MoELayer                                               # noqa: E402


def op_times(fn, x, steps: int) -> dict:
    """Op type -> milliseconds per run, from MindSpore's profiler over ``steps`` runs (``worker_ms.profile``)."""
    worker_ms.STATE["run"] = lambda: run_once(fn, x)
    return worker_ms.profile(steps, tempfile.mkdtemp(prefix="ms_llm_profile_moe_"))["by_type"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    args = p.parse_args()
    ms.set_device("CPU")
    ms.device_context.cpu.op_tuning.threads_num(os.cpu_count())
    ms.set_context(mode=ms.GRAPH_MODE)
    h, f, k = args.hidden, args.ffn, args.top_k
    cfg = layer_config(h, f, args.experts, k)
    rng = np.random.default_rng(0)
    x = Tensor(rng.normal(size=(args.batch, args.seq, h)).astype(np.float32))
    dy = Tensor(rng.normal(size=x.shape).astype(np.float32))
    runs = {"dense": Backward(FeedForward(h, k * f, "relu", has_bias=False), False, dy),
            "moe": Backward(MoELayer(cfg), True, dy)}
    for fn in runs.values():
        fn.set_train(True)
        run_once(fn, x)
        run_once(fn, x)
    wall = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            wall[name].append(run_once(fn, x))
    wall_ms = {name: 1e3 * statistics.median(v) for name, v in wall.items()}
    ops = {name: op_times(fn, x, 2) for name, fn in runs.items()}
    products = {"dense": ops["dense"].get("Custom", 0.0), "moe": ops["moe"].get("BatchMatMul", 0.0)}
    total = {name: sum(v.values()) for name, v in ops.items()}
    tokens = args.batch * args.seq
    lines = [f"# MoE layer profile: {args.experts} experts, top-{k}, {tokens} tokens ({tokens * k // args.experts} "
             f"per expert), H {h}, expert FFN {f}; dense FFN width {k * f}", "",
             f"`python bench/profile_moe.py --experts {args.experts} --top-k {k}`; forward + backward, float32, "
             f"{os.cpu_count()} threads, MindSpore {ms.__version__}.", "",
             "| | dense FFN | MoE layer | MoE / dense |", "|---|---|---|---|",
             f"| wall ms (median of {args.repeats}) | {wall_ms['dense']:.1f} | {wall_ms['moe']:.1f} | "
             f"{wall_ms['moe'] / wall_ms['dense']:.2f}x |",
             f"| op time ms (profiler) | {total['dense']:.1f} | {total['moe']:.1f} | "
             f"{total['moe'] / total['dense']:.2f}x |",
             f"| products ms (dense: OpenBLAS kernel `Custom`; MoE: expert `BatchMatMul`) | {products['dense']:.1f} | "
             f"{products['moe']:.1f} | {products['moe'] / products['dense']:.2f}x |",
             f"| everything else ms | {total['dense'] - products['dense']:.1f} | "
             f"{total['moe'] - products['moe']:.1f} | |", "",
             "The MoE's `Custom` ops are its router projection (OpenBLAS kernel) and the dispatch / combine kernels.",
             "", "## Op time by type (ms per forward + backward)", "", "| op | dense | MoE |", "|---|---|---|"]
    both = {op: (ops["dense"].get(op, 0.0), ops["moe"].get(op, 0.0)) for op in set(ops["dense"]) | set(ops["moe"])}
    for op, (d, m) in sorted(both.items(), key=lambda kv: -sum(kv[1])):
        if max(d, m) >= 0.1:
            lines.append(f"| {op} | {d:.2f} | {m:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"profile_moe_e{args.experts}_k{k}.md")
    with open(path + ".tmp", "w") as fh:
        fh.write(text)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
