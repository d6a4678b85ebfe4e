"""Benchmark: fused (flash-attention aot kernels) vs reference attention on this CPU.

fp32, B=1, nh=8, hd=64, Sq=Sk in {1024, 2048}, non-causal and causal. Each case (impl, seq, causal, pass) runs in
its own subprocess so that memory is measured in isolation: one warm-up call (graph compilation included), then
the median of ``--repeats`` timed calls, wall clock and process CPU time (the CPU time is the steadier number when
other jobs share the machine). Memory is the peak RSS growth of the subprocess from just before the first call
(after imports and inputs) to the end: it includes one graph compilation, a roughly constant overhead, so the
growth from 1024 to 2048 tokens shows how the working memory scales (quadratic for the reference's Sq x Sk
tensors, linear for the fused kernels).

With ``--bias`` every case adds a float32 score bias ``(1, nh, S, S)`` shared by the batch (the T5 / Switch
relative position bias), cores built with ``has_bias=True``; fwd+bwd then also returns d bias. The bias and d bias
are ``nh S^2`` floats each (128 MiB at S = 2048, nh = 8): the bias is an input allocated before the memory probe
starts, d bias an output inside it, so the fused kernel's RSS growth is d bias plus its O(S) buffers.

    python bench/bench_attention.py                 # prints a markdown table, writes bench/results/attention.json
    python bench/bench_attention.py --seqs 512 1024 --repeats 3
    python bench/bench_attention.py --bias          # writes bench/results/attention_bias.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "attention.json"
RESULTS_BIAS = ROOT / "bench" / "results" / "attention_bias.json"


# ----------------------------------------------------------------------------- memory probes (Linux /proc)
def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakRss:
    """Peak RSS since start(): the kernel's high-water mark reset via clear_refs, or a 2 ms sampler."""

    def __init__(self):
        self.base_kib = 0
        self.sampled_peak_kib = 0
        self._stop = threading.Event()
        self._thread = None
        self.method = ""

    def start(self):
        self.base_kib = _status_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                fh.write("5")                                   # resets VmHWM to the current RSS
            self.method = "VmHWM"
        except OSError:
            self.method = "sampled"
            self.sampled_peak_kib = self.base_kib
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self):
        while not self._stop.is_set():
            self.sampled_peak_kib = max(self.sampled_peak_kib, _status_kib("VmRSS"))
            time.sleep(0.002)

    def delta_mib(self) -> float:
        if self.method == "VmHWM":
            peak = _status_kib("VmHWM")
        else:
            self._stop.set()
            self._thread.join()
            peak = self.sampled_peak_kib
        return (peak - self.base_kib) / 1024.0


# ----------------------------------------------------------------------------- one case, in a subprocess
def worker(impl: str, seq: int, causal: bool, mode: str, heads: int, head_dim: int, repeats: int,
           bias: bool = False) -> dict:
    import numpy as np
    import mindspore as ms
    from mindspore import Tensor, nn, ops

    sys.path.insert(0, str(ROOT))
    from ms_llm.kernels import _build
    from ms_llm.kernels.attention import make_attention

    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)

    class FwdBwd(nn.Cell):
        """Gradients of ``net`` w.r.t. all its inputs (q, k, v, key_mask[, bias]); the last input is the cotangent."""

        def __init__(self, net):
            super().__init__()
            self.net = net
            self.grad = ops.GradOperation(get_all=True, sens_param=True)

        def construct(self, *inputs):
            return self.grad(self.net)(*inputs)

    rng = np.random.default_rng(0)
    shape = (1, heads, seq, head_dim)
    q, k, v, dout = (Tensor(rng.standard_normal(shape).astype(np.float32)) for _ in range(4))
    key_mask = Tensor(np.ones((1, seq), np.float32))
    net = make_attention(impl, head_dim, causal=causal, has_bias=bias)
    args = (q, k, v, key_mask)
    if bias:                                                        # (1, nh, S, S) shared by the batch, like T5's
        args += (Tensor(rng.normal(0.0, 0.5, (1, heads, seq, seq)).astype(np.float32)),)
    if mode == "fwd":
        def call():
            return net(*args).asnumpy()
    else:
        cell = FwdBwd(net)

        def call():
            return [g.asnumpy() for g in cell(*args, dout)]

    mem = PeakRss()
    mem.start()
    t0 = time.perf_counter()
    call()                                                          # warm-up, includes graph compilation
    first_s = time.perf_counter() - t0
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        call()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return {
        "impl": impl, "seq": seq, "causal": causal, "mode": mode, "heads": heads, "head_dim": head_dim,
        "bias": [1, heads, seq, seq] if bias else None,
        "wall_ms_median": 1e3 * statistics.median(walls), "cpu_ms_median": 1e3 * statistics.median(cpus),
        "wall_ms": [1e3 * x for x in walls], "cpu_ms": [1e3 * x for x in cpus], "first_call_s": first_s,
        "peak_rss_delta_mib": mem.delta_mib(), "memory_method": mem.method,
        "kernel_isa": _build.resolve_isa("auto") if impl == "fused" else None,
    }


def run_case(args, impl, seq, causal, mode) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--impl", impl, "--seq", str(seq),
           "--mode", mode, "--heads", str(args.heads), "--head-dim", str(args.head_dim),
           "--repeats", str(args.repeats), "--causal", "yes" if causal else "no"] + (["--bias"] if args.bias else [])
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, check=False)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"case {impl} seq={seq} causal={causal} {mode} failed (exit {res.returncode}):\n"
                           f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return json.loads(lines[-1])


def machine_info() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import mindspore
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
            "mindspore": mindspore.__version__, "load_average_start": os.getloadavg()}


def table(results: list[dict]) -> str:
    def get(impl, seq, causal, mode, key):
        for r in results:
            if (r["impl"], r["seq"], r["causal"], r["mode"]) == (impl, seq, causal, mode):
                return r[key]
        return float("nan")

    rows = ["| seq | causal | impl | fwd ms (wall / cpu) | fwd+bwd ms (wall / cpu) | peak RSS delta fwd MiB "
            "| peak RSS delta fwd+bwd MiB |",
            "|---:|:---:|:---|---:|---:|---:|---:|"]
    keys = sorted({(r["seq"], r["causal"]) for r in results})
    for seq, causal in keys:
        for impl in ("reference", "fused"):
            fw = f"{get(impl, seq, causal, 'fwd', 'wall_ms_median'):.0f} / {get(impl, seq, causal, 'fwd', 'cpu_ms_median'):.0f}"
            fb = (f"{get(impl, seq, causal, 'fwdbwd', 'wall_ms_median'):.0f} / "
                  f"{get(impl, seq, causal, 'fwdbwd', 'cpu_ms_median'):.0f}")
            rows.append(f"| {seq} | {'yes' if causal else 'no'} | {impl} | {fw} | {fb} | "
                        f"{get(impl, seq, causal, 'fwd', 'peak_rss_delta_mib'):.0f} | "
                        f"{get(impl, seq, causal, 'fwdbwd', 'peak_rss_delta_mib'):.0f} |")
        speed = []
        for mode in ("fwd", "fwdbwd"):
            for key in ("wall_ms_median", "cpu_ms_median"):
                speed.append(get("reference", seq, causal, mode, key) / get("fused", seq, causal, mode, key))
        rows.append(f"| {seq} | {'yes' if causal else 'no'} | **speed-up** | {speed[0]:.2f}x / {speed[1]:.2f}x | "
                    f"{speed[2]:.2f}x / {speed[3]:.2f}x | | |")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--causal", choices=("no", "yes", "both"), default="both")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per case")
    parser.add_argument("--bias", action="store_true",
                        help="add a float32 (1, nh, S, S) score bias (T5 relative position bias) to every case")
    parser.add_argument("--out", default=None, help="results file (default bench/results/attention[_bias].json)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=("reference", "fused"), help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("fwd", "fwdbwd"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.impl, args.seq, args.causal == "yes", args.mode, args.heads, args.head_dim,
                                args.repeats, args.bias)))
        return 0

    causal_values = {"no": [False], "yes": [True], "both": [False, True]}[args.causal]
    info = machine_info()
    results = []
    for seq in args.seqs:
        for causal in causal_values:
            for mode in ("fwd", "fwdbwd"):
                for impl in ("reference", "fused"):
                    res = run_case(args, impl, seq, causal, mode)
                    results.append(res)
                    print(f"{impl:9s} seq={seq} causal={causal!s:5s} {mode:6s} bias={args.bias!s:5s} wall {res['wall_ms_median']:8.1f} ms"
                          f"  cpu {res['cpu_ms_median']:8.1f} ms  peak RSS +{res['peak_rss_delta_mib']:.0f} MiB",
                          flush=True)
    info["load_average_end"] = os.getloadavg()
    md = table(results)
    print()
    bias_note = f", bias (1, {args.heads}, S, S) fp32" if args.bias else ""
    print(f"fp32, B=1, nh={args.heads}, hd={args.head_dim}{bias_note}; median of {args.repeats} after one warm-up; "
          f"{info['cpu']}, {info['cores']} cores, load average {info['load_average_start'][0]:.1f} at start")
    print(md)
    out = Path(args.out) if args.out else (RESULTS_BIAS if args.bias else RESULTS)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": {"dtype": "float32", "batch": 1, "heads": args.heads,
                                          "head_dim": args.head_dim, "repeats": args.repeats,
                                          "bias": [1, args.heads, "S", "S"] if args.bias else None},
                               "machine": info, "results": results, "table_markdown": md}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
