"""Benchmark: the output-head GEMV (ms_llm/kernels/gemv.py) vs MindSpore's MatMul vs torch, and generation with each head.

1. **Head product** ``logits (B, V) = x (B, H) @ W (V, H)^T`` with H = 768, V = 50257 (GPT-2's tied embedding),
   float32, B in ``--head-batches`` (1, 8, 16): ms_llm's ``Gemv`` (the aot C++ kernel) and ``MatMulNT`` (``ops.MatMul(transpose_b=
   True)``, what the model's head ran before) as GRAPH_MODE cells with W a Parameter, and ``torch.nn.functional.
   linear(x, W)`` (what Hugging Face's ``lm_head`` runs). Time per call (the MindSpore side includes copying the
   (B, V) result to numpy, ~0.02 ms at B = 1).
2. **Generation**: GPT with 2 layers x 768, 12 heads, FFN 3072, vocab 50257, tied embeddings, learned positions,
   float32 (the ``quick`` preset of bench/cases.py); greedy, ``--prompt`` random tokens, ``--new-tokens`` new tokens
   (no stop token), B in ``--batches`` (1, 8): ``ms_llm.generation.generate(head_impl='matmul' | 'gemv')`` (same
   compiled graphs otherwise) and Hugging Face ``GPT2LMHeadModel.generate`` (the bench's peer, ``worker_hf.py``).
   Tokens/s = B * new_tokens / wall time of the whole call (prompt included).

Both sides run in long-lived worker processes (``bench/harness.py``) with 2 compute threads; every case is built,
compiled and warmed up first, then the runner interleaves them round by round (only one worker computes at a time),
so all numbers come from the same run under the same machine load. Reported: the median over all timed calls.

    python bench/bench_gemv.py                     # prints a markdown table, writes bench/results/gemv.json
    python bench/bench_gemv.py --rounds 3 --calls 10 --skip-generate
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

RESULTS = os.path.join(ROOT, "bench", "results", "gemv.json")
PEER_PYTHON = "/work/refenv/bin/python"
HIDDEN, VOCAB = 768, 50257
GEN_MODEL = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=2, num_heads=12, ffn_hidden_size=3072,
                 max_position_embeddings=2048, activation="gelu_new", norm_eps=1e-5, dropout=0.1)
STATE = {}


# ----------------------------------------------------------------------------------------------- ms_llm worker
def _ms_init(threads: int) -> None:
    sys.path.insert(0, ROOT)
    import mindspore as ms
    ms.set_device("CPU")
    ms.device_context.cpu.op_tuning.threads_num(threads)        # as bench/worker_ms.py
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_seed(0)


def ms_setup_head(name: str, impl: str, batch: int, warmup: int = 3):
    import numpy as np
    import mindspore as ms
    from mindspore import Tensor, nn

    from ms_llm.kernels.gemv import make_gemv

    class Head(nn.Cell):
        def __init__(self, w):
            super().__init__()
            self.w = ms.Parameter(Tensor(w), name="w")
            self.op = make_gemv(impl)

        def construct(self, x):
            return self.op(x, self.w)                                        # (B, V)

    rng = np.random.default_rng(0)
    net = Head((rng.standard_normal((VOCAB, HIDDEN)) * 0.02).astype(np.float32))
    x = Tensor(rng.standard_normal((batch, HIDDEN)).astype(np.float32))

    def run():
        return net(x).asnumpy()
    time_calls(run, warmup)
    STATE[name] = run
    return {}


def ms_setup_generate(name: str, head_impl: str, batch: int, prompt: int, new_tokens: int):
    import numpy as np
    from ms_llm.generation import generate
    from ms_llm.models.gpt import GPTLMHeadModel
    from worker_ms import _model_cfg

    if "gen_model" not in STATE:                                            # one model shared by both heads
        STATE["gen_model"] = GPTLMHeadModel(_model_cfg("gpt", GEN_MODEL, "reference"))
        STATE["gen_model"].set_train(False)
    net = STATE["gen_model"]
    ids = np.random.default_rng(1).integers(3, VOCAB, (batch, prompt)).astype(np.int64)

    def run():
        out = generate(net, ids, max_new_tokens=new_tokens, eos_token_id=None, head_impl=head_impl)
        if out.shape != (batch, prompt + new_tokens):
            raise RuntimeError(f"generate returned {out.shape}")
        return out
    first = time_calls(run, 1)[0]                                          # graph compilation included
    STATE[name] = run
    return {"first_call_s": first}


# ----------------------------------------------------------------------------------------------- torch worker
def _torch_init(threads: int) -> None:
    import torch
    torch.set_num_threads(threads)
    torch.manual_seed(0)


def torch_setup_head(name: str, batch: int, warmup: int = 3):
    import numpy as np
    import torch
    rng = np.random.default_rng(0)
    w = torch.from_numpy((rng.standard_normal((VOCAB, HIDDEN)) * 0.02).astype(np.float32))
    x = torch.from_numpy(rng.standard_normal((batch, HIDDEN)).astype(np.float32))

    def run():
        with torch.inference_mode():
            return torch.nn.functional.linear(x, w).numpy()
    time_calls(run, warmup)
    STATE[name] = run
    return {}


def torch_setup_generate(name: str, batch: int, prompt: int, new_tokens: int):
    from worker_hf import _model, generate_fn
    if "gen_model" not in STATE:
        STATE["gen_model"] = _model("gpt", GEN_MODEL, train=False)
    run = generate_fn(STATE["gen_model"], VOCAB, batch, prompt, new_tokens)
    first = time_calls(run, 1)[0]
    STATE[name] = run
    return {"first_call_s": first}


def run(name: str, n: int):
    return {"times": time_calls(STATE[name], n)}


def versions():
    out = {"python": sys.version.split()[0]}
    try:
        import mindspore
        out["mindspore"] = mindspore.__version__
        from ms_llm.kernels._build import library_path, resolve_isa
        out["isa"] = resolve_isa()
        out["library"] = str(library_path("gemv.cc"))
    except ImportError:
        import torch
        import transformers
        out.update(torch=torch.__version__, transformers=transformers.__version__,
                   torch_threads=torch.get_num_threads())
    return out


# ----------------------------------------------------------------------------------------------- runner
def _fmt(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-batches", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="generation batches")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (head product)")
    parser.add_argument("--calls", type=int, default=20, help="timed calls per case and round (head product)")
    parser.add_argument("--gen-rounds", type=int, default=2, help="interleaved rounds of one generate call each")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument("--no-peer", action="store_true", help="do not run the torch / Hugging Face side")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)

    logdir = tempfile.mkdtemp(prefix="bench_gemv_")
    workers = {"ms": Worker("ms", [sys.executable, os.path.abspath(__file__), "--worker", "ms", "--threads",
                                   str(args.threads)], args.threads, os.path.join(logdir, "ms.log"))}
    if not args.no_peer:
        workers["torch"] = Worker("torch", [PEER_PYTHON, os.path.abspath(__file__), "--worker", "torch",
                                            "--threads", str(args.threads)], args.threads,
                                  os.path.join(logdir, "torch.log"))
    t_start = time.time()
    try:
        res = {"config": {"hidden": HIDDEN, "vocab": VOCAB, "dtype": "float32", "threads": args.threads,
                          "head_batches": args.head_batches, "batches": args.batches, "rounds": args.rounds, "calls": args.calls,
                          "gen_model": GEN_MODEL, "prompt": args.prompt, "new_tokens": args.new_tokens,
                          "gen_rounds": args.gen_rounds, "machine": platform.machine(),
                          "cpus": os.cpu_count()},
               "versions": {side: w.call("versions", 600) for side, w in workers.items()}}
        # ---- head product
        cases = []                                                         # (side, name, batch, label)
        for b in args.head_batches:
            for impl in ("gemv", "matmul"):
                name = f"head_{impl}_{b}"
                workers["ms"].call("ms_setup_head", 600, name=name, impl=impl, batch=b)
                cases.append(("ms", name, b, f"ms_llm {'Gemv' if impl == 'gemv' else 'MatMul'}"))
            if "torch" in workers:
                workers["torch"].call("torch_setup_head", 600, name=f"head_torch_{b}", batch=b)
                cases.append(("torch", f"head_torch_{b}", b, "torch F.linear"))
        times = {c[1]: [] for c in cases}
        for _ in range(args.rounds):
            for side, name, _, _ in cases:
                times[name] += workers[side].call("run", 600, name=name, n=args.calls)["times"]
        head = []
        for side, name, b, label in cases:
            ms_ = statistics.median(times[name]) * 1e3
            head.append({"batch": b, "impl": label, "median_ms": ms_, "min_ms": min(times[name]) * 1e3,
                         "weight_gb_per_s": VOCAB * HIDDEN * 4 / (ms_ * 1e-3) / 1e9, "calls": len(times[name])})
        res["head"] = head
        # ---- generation
        gen = []
        if not args.skip_generate:
            gcases = []
            for b in args.batches:
                for h in ("matmul", "gemv"):
                    name = f"gen_{h}_{b}"
                    info = workers["ms"].call("ms_setup_generate", 3600, name=name, head_impl=h, batch=b,
                                              prompt=args.prompt, new_tokens=args.new_tokens)
                    gcases.append(("ms", name, b, f"ms_llm head_impl={h}", info["first_call_s"]))
                if "torch" in workers:
                    info = workers["torch"].call("torch_setup_generate", 3600, name=f"gen_hf_{b}", batch=b,
                                                 prompt=args.prompt, new_tokens=args.new_tokens)
                    gcases.append(("torch", f"gen_hf_{b}", b, "Hugging Face generate", info["first_call_s"]))
            gtimes = {c[1]: [] for c in gcases}
            for _ in range(args.gen_rounds):
                for side, name, *_ in gcases:
                    gtimes[name] += workers[side].call("run", 3600, name=name, n=1)["times"]
            for side, name, b, label, first in gcases:
                t = statistics.median(gtimes[name])
                gen.append({"batch": b, "impl": label, "median_s": t, "tokens_per_s": b * args.new_tokens / t,
                            "first_call_s": first, "calls": len(gtimes[name])})
            res["generate"] = gen
    finally:
        for w in workers.values():
            w.close()
    res["wall_s"] = time.time() - t_start
    res["worker_logs"] = logdir

    lines = [f"## Output head: logits (B, {VOCAB}) = x (B, {HIDDEN}) @ W^T, float32, {args.threads} threads",
             "", "| B | impl | median ms | min ms | W read GB/s | vs ms_llm MatMul |", "|---|---|---|---|---|---|"]
    for r in head:
        base = next(h["median_ms"] for h in head if h["batch"] == r["batch"] and h["impl"] == "ms_llm MatMul")
        lines.append(f"| {r['batch']} | {r['impl']} | {_fmt(r['median_ms'])} | {_fmt(r['min_ms'])} | "
                     f"{_fmt(r['weight_gb_per_s'], 1)} | {_fmt(base / r['median_ms'])}x |")
    if gen:
        lines += ["", f"## Generation: GPT 2 x {HIDDEN}, vocab {VOCAB}, prompt {args.prompt}, {args.new_tokens} new "
                  f"tokens, greedy, float32", "",
                  "| B | impl | tokens/s | median s | first call s | vs Hugging Face |", "|---|---|---|---|---|---|"]
        for r in gen:
            peer = next((g["tokens_per_s"] for g in gen if g["batch"] == r["batch"]
                         and g["impl"] == "Hugging Face generate"), None)
            rel = f"{r['tokens_per_s'] / peer:.2f}x" if peer else "-"
            lines.append(f"| {r['batch']} | {r['impl']} | {_fmt(r['tokens_per_s'], 1)} | {_fmt(r['median_s'])} | "
                         f"{_fmt(r['first_call_s'])} | {rel} |")
    md = "\n".join(lines)
    print(md)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(res, fh, indent=2)
    print(f"\nwrote {args.out} ({res['wall_s']:.0f} s); worker logs in {logdir}")
    return 0


if __name__ == "__main__":
    if "--worker" in sys.argv:
        side = sys.argv[sys.argv.index("--worker") + 1]
        threads = int(sys.argv[sys.argv.index("--threads") + 1])
        if side == "ms":
            _ms_init(threads)
            serve({"ms_setup_head": ms_setup_head, "ms_setup_generate": ms_setup_generate, "run": run,
                   "versions": versions})
        else:
            _torch_init(threads)
            serve({"torch_setup_head": torch_setup_head, "torch_setup_generate": torch_setup_generate, "run": run,
                   "versions": versions})
    else:
        raise SystemExit(main())
