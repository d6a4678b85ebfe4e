"""Benchmark: the training step's linear products and GELU on CPU: ms_llm's OpenBLAS product and fused GELU
(ms_llm/kernels/blas_linear.py, gelu.py) vs MindSpore's ops (their references) vs torch.

Cases, forward + backward (gradients of every input), float32, one call each:
* **linear** ``y = x W^T + b``, ``x (N, K)``, ``W (M, K)``: the FFN's two products and the attention's QKV-sized
  product at BERT-base / GPT-3 Small training shapes (N = 1024 tokens); MindSpore side: ``BlasLinearProduct`` and
  ``ReferenceLinearProduct`` (``ops.MatMul(transpose_b=True)`` + ``ops.Add``, what ``Linear`` ran before); torch:
  ``F.linear`` + ``backward``. GFLOPS = 6 N K M / time (forward and the two backward products).
* **gelu** ``(N, 3072)``: exact (erf, BERT) and tanh (GPT-2) forms; MindSpore side: ``FusedGelu`` and
  ``ReferenceGelu`` (``ops.gelu`` / ``x sigmoid(2 z)`` from ops); torch: ``F.gelu(approximate='none' | 'tanh')``.

Both sides run in long-lived worker processes (``bench/harness.py``) with 2 compute threads, every case built and
warmed up first, then interleaved round by round (one worker computes at a time). Reported: the median per call.

    python bench/bench_train_kernels.py            # markdown table; writes bench/results/train_kernels.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from harness import Worker, serve, time_calls                                # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "results", "train_kernels.json")
PEER_PYTHON = "/work/refenv/bin/python"
LINEAR_SHAPES = [(1024, 768, 3072), (1024, 3072, 768), (1024, 768, 2304)]    # (N, K, M): fc_in, fc_out, qkv
GELU_ROWS = 1024
STATE = {}


def _arrays(case: dict):
    import numpy as np
    rng = np.random.default_rng(0)
    if case["op"] == "linear":
        n, k, m = case["shape"]
        return [rng.standard_normal(s).astype(np.float32) for s in ((n, k), (m, k), (m,), (n, m))]
    return [rng.standard_normal((GELU_ROWS, 3072)).astype(np.float32) for _ in range(2)]


# ----------------------------------------------------------------------------------------------- ms_llm worker
def _ms_init(threads: int) -> None:
    sys.path.insert(0, ROOT)
    import mindspore as ms
    ms.set_device("CPU")
    ms.device_context.cpu.op_tuning.threads_num(threads)        # as bench/worker_ms.py
    ms.set_context(mode=ms.GRAPH_MODE)


def ms_setup(name: str, case: dict, impl: str, warmup: int = 3):
    from mindspore import Tensor, nn, ops

    from ms_llm.kernels.blas_linear import make_linear_product
    from ms_llm.kernels.gelu import make_gelu

    class FwdBwd(nn.Cell):
        def __init__(self, op):
            super().__init__()
            self.op = op
            self.grad = ops.GradOperation(get_all=True, sens_param=True)

        def construct(self, *inputs):
            return self.grad(self.op)(*inputs)

    if case["op"] == "linear":
        op = make_linear_product("blas" if impl == "fused" else "reference")
    else:
        op = make_gelu(impl, case["kind"])
    net = FwdBwd(op)
    inputs = [Tensor(a) for a in _arrays(case)]

    def run():
        return [g.asnumpy() for g in net(*inputs)]
    time_calls(run, warmup)
    STATE[name] = run
    return {}


# ----------------------------------------------------------------------------------------------- torch worker
def _torch_init(threads: int) -> None:
    import torch
    torch.set_num_threads(threads)


def torch_setup(name: str, case: dict, warmup: int = 3):
    import torch
    import torch.nn.functional as F
    arrays = [torch.from_numpy(a) for a in _arrays(case)]
    inputs = [a.clone().requires_grad_(True) for a in arrays[:-1]]
    dy = arrays[-1]

    def run():
        for t in inputs:
            t.grad = None
        if case["op"] == "linear":
            y = F.linear(*inputs)
        else:
            y = F.gelu(inputs[0], approximate="none" if case["kind"] == "gelu" else "tanh")
        y.backward(dy)
        return [t.grad.numpy() for t in inputs]
    time_calls(run, warmup)
    STATE[name] = run
    return {}


def run(name: str, n: int):
    return {"times": time_calls(STATE[name], n)}


def versions():
    out = {"python": sys.version.split()[0]}
    try:
        import mindspore
        out["mindspore"] = mindspore.__version__
    except ImportError:
        import torch
        out.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    return out


# ----------------------------------------------------------------------------------------------- runner
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--calls", type=int, default=5, help="timed calls per case and round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-peer", action="store_true", help="do not run the torch side")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)

    cases = [{"op": "linear", "shape": s} for s in LINEAR_SHAPES]
    cases += [{"op": "gelu", "kind": k} for k in ("gelu", "gelu_new")]
    logdir = tempfile.mkdtemp(prefix="bench_train_kernels_")
    workers = {"ms": Worker("ms", [sys.executable, os.path.abspath(__file__), "--worker", "ms", "--threads",
                                   str(args.threads)], args.threads, os.path.join(logdir, "ms.log"))}
    if not args.no_peer:
        workers["torch"] = Worker("torch", [PEER_PYTHON, os.path.abspath(__file__), "--worker", "torch",
                                            "--threads", str(args.threads)], args.threads,
                                  os.path.join(logdir, "torch.log"))
    t_start = time.time()
    entries = []                                                           # (side, name, case index, label)
    try:
        res = {"config": {"threads": args.threads, "rounds": args.rounds, "calls": args.calls, "dtype": "float32",
                          "machine": platform.machine(), "cpus": os.cpu_count()},
               "versions": {side: w.call("versions", 600) for side, w in workers.items()}}
        for i, case in enumerate(cases):
            for impl, label in (("fused", "ms_llm kernel"), ("reference", "MindSpore ops")):
                workers["ms"].call("ms_setup", 600, name=f"{i}_{impl}", case=case, impl=impl)
                entries.append(("ms", f"{i}_{impl}", i, label))
            if "torch" in workers:
                workers["torch"].call("torch_setup", 600, name=f"{i}_torch", case=case)
                entries.append(("torch", f"{i}_torch", i, "torch"))
        times = {e[1]: [] for e in entries}
        for _ in range(args.rounds):
            for side, name, _, _ in entries:
                times[name] += workers[side].call("run", 600, name=name, n=args.calls)["times"]
    finally:
        for w in workers.values():
            w.close()
    rows = []
    for side, name, i, label in entries:
        case = cases[i]
        t = statistics.median(times[name])
        row = {"case": case, "impl": label, "median_ms": t * 1e3, "calls": len(times[name])}
        if case["op"] == "linear":
            n, k, m = case["shape"]
            row["gflops"] = 6 * n * k * m / t / 1e9
        rows.append(row)
    res.update(rows=rows, wall_s=time.time() - t_start, worker_logs=logdir)

    lines = [f"Forward + backward, float32, {args.threads} threads; median of {args.rounds} x {args.calls} calls.", "",
             "| case | impl | median ms | GFLOPS | vs MindSpore ops |", "|---|---|---|---|---|"]
    for r in rows:
        c = r["case"]
        what = (f"linear N={c['shape'][0]} K={c['shape'][1]} M={c['shape'][2]}" if c["op"] == "linear"
                else f"{c['kind']} ({GELU_ROWS}, 3072)")
        base = next(x["median_ms"] for x in rows if x["case"] == c and x["impl"] == "MindSpore ops")
        gf = f"{r['gflops']:.0f}" if "gflops" in r else "-"
        lines.append(f"| {what} | {r['impl']} | {r['median_ms']:.1f} | {gf} | {base / r['median_ms']:.2f}x |")
    print("\n".join(lines))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(res, fh, indent=2)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as fh:
        fh.write("# Training kernels: linear products and GELU (bench/bench_train_kernels.py)\n\n" + "\n".join(lines)
                 + "\n")
    print(f"\nwrote {args.out} ({res['wall_s']:.0f} s); worker logs in {logdir}")
    return 0


if __name__ == "__main__":
    if "--worker" in sys.argv:
        side = sys.argv[sys.argv.index("--worker") + 1]
        threads = int(sys.argv[sys.argv.index("--threads") + 1])
        if side == "ms":
            _ms_init(threads)
            serve({"ms_setup": ms_setup, "run": run, "versions": versions})
        else:
            _torch_init(threads)
            serve({"torch_setup": torch_setup, "run": run, "versions": versions})
    else:
        raise SystemExit(main())
