"""Run every ms_llm benchmark against its peer in one invocation; write a markdown table and JSON.

    python bench/run_all.py --quick                   # ~10 min on 2 cores: reduced depth/batch, same widths
    python bench/run_all.py                           # full shapes: BERT-base (seq 128), GPT-3 Small (seq 512)
    python bench/run_all.py --only train,generate --threads 2 --peer-python /work/refenv/bin/python

Figures (see bench/README.md): matmul peak (MindSpore, numpy, torch), training step tokens/s and MFU against Hugging
Face ``transformers`` on PyTorch CPU, generation tokens/s against ``generate`` (256 new tokens, batch 1 and 8), the
MoE layer against a dense FFN of equal activated FLOPs (bench_moe.py), graph compile time at 12 vs 48 layers.

Every figure is the median of several timed runs after warm-up. ms_llm and the peer each live in their own worker
process (MindSpore needs numpy<2, the peer venv has numpy 2), both pinned to ``--threads`` compute threads, and the
runner alternates them round by round (ours first in even rounds, the peer first in odd ones): the reported ratio is
the median of the per-round ratios, which holds on a machine other jobs are loading.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from cases import preset                                                      # noqa: E402
from harness import Worker, WorkerError, median, tail, thread_env             # noqa: E402

SUITES = ("matmul", "train", "generate", "moe", "compile")
DEFAULT_PEER = "/work/refenv/bin/python"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------- machine
def machine_info(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as fh:
            mem_gib = int(fh.readline().split()[1]) / 2 ** 20
    except OSError:
        mem_gib = None
    flags = ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    have = line.split()
                    flags = " ".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in have)
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem_gib, "isa": flags, "threads": threads,
            "os": platform.platform(), "git_commit": commit, "load_average_start": os.getloadavg(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


# ----------------------------------------------------------------------------------------------- runner
class Runner:
    def __init__(self, args):
        self.args = args
        self.logdir = tempfile.mkdtemp(prefix="ms_llm_bench_")
        self.peer_python = args.peer_python
        self.peer_note = None
        if self.peer_python and not os.path.exists(self.peer_python):
            self.peer_note = f"peer interpreter {self.peer_python} not found: peers skipped"
            self.peer_python = None
        elif not self.peer_python:
            self.peer_note = "no peer interpreter (--peer-python): peers skipped"
        self.versions = {}

    def worker(self, side: str, tag: str) -> Worker:
        """side 'ours' (this repo's ms_llm, or --ms-llm-root's), 'candidate' (--candidate-root's) or 'peer'."""
        if side in ("ours", "candidate"):
            argv = [sys.executable, os.path.join(HERE, "worker_ms.py")]
            root = self.args.ms_llm_root if side == "ours" else self.args.candidate_root
            if root:
                argv += ["--ms-llm-root", root]
        else:
            argv = [self.peer_python, os.path.join(HERE, "worker_hf.py")]
        argv += ["--threads", str(self.args.threads)]
        w = Worker(f"{side}:{tag}", argv, self.args.threads, os.path.join(self.logdir, f"{side}_{tag}.log"))
        if side not in self.versions:
            self.versions[side] = w.call("versions", 300)
        return w

    def sides(self, tag: str, candidate: bool = True) -> dict:
        """{side: worker}: ours, the candidate tree (if --candidate-root), the peer (if its interpreter works)."""
        workers = {"ours": self.worker("ours", tag)}
        if candidate and self.args.candidate_root:
            workers["candidate"] = self.worker("candidate", tag)
        if self.peer_python:
            try:
                workers["peer"] = self.worker("peer", tag)
            except WorkerError as e:
                self.peer_note = f"peer worker failed to start ({e}): peers skipped"
                log(self.peer_note)
                self.peer_python = None
        return workers

    @staticmethod
    def close(workers: dict) -> None:
        for w in workers.values():
            w.close()

    def setup(self, workers: dict, cmd: str, label: str, out: dict, **kw) -> dict:
        """Run ``cmd`` on every side; a failing side other than 'ours' is dropped (its error kept in ``out``)."""
        setup = {}
        for side in list(workers):
            try:
                setup[side] = workers[side].call(cmd, self.args.setup_timeout, **kw)
            except WorkerError as e:
                if side == "ours":
                    raise
                out[f"{side}_error"] = str(e)
                log(f"{label}: {side} failed: {last_error_line(str(e))}")
                workers.pop(side).close()
        return setup

    def interleave(self, workers: dict, rounds: int, per_round: int, timeout: float) -> dict:
        """{side: [[times of round 0], [round 1], ...]}: the order of the sides rotates every round, so each goes
        first, in the middle and last equally often."""
        times = {side: [] for side in workers}
        order = list(workers)
        for r in range(rounds):
            k = r % len(order)
            for side in order[k:] + order[:k]:
                times[side].append(workers[side].call("run", timeout, n=per_round)["times"])
        return times

    @staticmethod
    def paired(times: dict, a: str, b: str) -> float:
        """Median over rounds of median(b's times) / median(a's times): a's speed over b's, paired by round."""
        return statistics.median([statistics.median(y) / statistics.median(x) for x, y in zip(times[a], times[b])])

    def ratios(self, times: dict, out: dict) -> None:
        if "peer" in times:
            out["ratio_rounds"] = [statistics.median(p) / statistics.median(o)
                                   for o, p in zip(times["ours"], times["peer"])]
            out["ratio"] = self.paired(times, "ours", "peer")              # ours tokens/s over the peer's
            if "candidate" in times:
                out["candidate_ratio"] = self.paired(times, "candidate", "peer")
        if "candidate" in times:
            out["candidate_vs_ours"] = self.paired(times, "candidate", "ours")

    # --------------------------------------------------------------------------------------- suites
    def matmul(self, c: dict) -> dict:
        sides = self.sides("matmul", candidate=False)
        rows = []
        try:
            for n in c["sizes"]:
                # mindspore and numpy share our worker, set up one at a time
                libs = {lib: sides[side] for lib, side in (("mindspore", "ours"), ("numpy", "ours"), ("torch", "peer"))
                        if side in sides}
                best = {lib: [] for lib in libs}
                for r in range(c["rounds"]):
                    for lib in (list(libs) if r % 2 == 0 else list(libs)[::-1]):
                        libs[lib].call("setup_matmul", 600, size=n, lib=lib)
                        best[lib] += libs[lib].call("run", 600, n=c["per_round"])["times"]
                for lib, ts in best.items():
                    flops = 2.0 * n ** 3
                    rows.append({"lib": lib, "n": n, "best_gflops": flops / min(ts) / 1e9,
                                 "median_gflops": flops / statistics.median(ts) / 1e9, "runs": len(ts)})
                    log(f"matmul {lib} n={n}: best {rows[-1]['best_gflops']:.1f} GFLOPS, "
                        f"median {rows[-1]['median_gflops']:.1f}")
        finally:
            self.close(sides)
        peak = {}
        for r in rows:
            peak[r["lib"]] = max(peak.get(r["lib"], 0.0), r["best_gflops"])
        return {"rows": rows, "peak_gflops_by_lib": peak, "peak_gflops": max(peak.values())}

    def train(self, name: str, c: dict, peak_gflops: float | None) -> dict:
        arch = "bert" if name == "train_bert" else "gpt"
        kw = dict(arch=arch, model=c["model"], batch=c["batch"], seq=c["seq"], warmup=c["warmup"],
                  attention_impl=self.args.attention_impl)
        out = {"arch": arch, "batch": c["batch"], "seq": c["seq"], "layers": c["model"]["num_layers"],
               "hidden": c["model"]["hidden_size"], "vocab": c["model"]["vocab_size"]}
        workers = self.sides(name)
        try:
            setup = self.setup(workers, "setup_train", name, out, **kw)
            for side, s in setup.items():
                log(f"{name}: {side} set up ({s['params']:,} params, first step {s['first_step_s']:.1f} s)")
            times = self.interleave(workers, c["rounds"], c["per_round"], self.args.run_timeout)
        finally:
            self.close(workers)
        tokens = c["batch"] * c["seq"]
        flops = setup["ours"]["flops_per_token"]
        out.update(tokens_per_step=tokens, flops_per_token=flops, params=setup["ours"]["params"],
                   first_step_s=setup["ours"]["first_step_s"])
        for side, rounds in times.items():
            flat = [t for r in rounds for t in r]
            step_s = statistics.median(flat)
            out[side] = {"step_s": step_s, "tokens_per_s": tokens / step_s, "runs": flat,
                         "first_step_s": setup[side]["first_step_s"], "params": setup[side]["params"],
                         "mfu": (tokens / step_s * flops / (peak_gflops * 1e9)) if peak_gflops else None}
            if setup[side]["params"] != setup["ours"]["params"]:
                out["param_mismatch"] = f"ours {setup['ours']['params']:,} vs {side} {setup[side]['params']:,}"
        self.ratios(times, out)
        out["load_average_1min_after"] = os.getloadavg()[0]
        log(f"{name}: " + ", ".join(f"{side} {out[side]['tokens_per_s']:.0f} tok/s" for side in times)
            + (f", ours / peer {out['ratio']:.2f}" if "ratio" in out else "")
            + (f", candidate / ours {out['candidate_vs_ours']:.2f}" if "candidate_vs_ours" in out else ""))
        return out

    def generate(self, c: dict) -> list:
        workers = self.sides("generate")
        rows = []
        try:
            for b in c["batches"]:
                kw = dict(model=c["model"], batch=b, prompt=c["prompt"], new_tokens=c["new_tokens"],
                          warmup=c["warmup"], attention_impl=self.args.attention_impl)
                row = {"batch": b, "prompt": c["prompt"], "new_tokens": c["new_tokens"],
                       "layers": c["model"]["num_layers"]}
                try:
                    setup = self.setup(workers, "setup_generate", f"generate batch {b}", row, **kw)
                    times = self.interleave(workers, c["rounds"], c["per_round"], self.args.run_timeout)
                except WorkerError as e:
                    row["error"] = str(e)
                    rows.append(row)
                    log(f"generate batch {b}: failed: {last_error_line(str(e))}")
                    continue
                toks = b * c["new_tokens"]
                for side, rounds in times.items():
                    flat = [t for r in rounds for t in r]
                    row[side] = {"call_s": statistics.median(flat), "tokens_per_s": toks / statistics.median(flat),
                                 "runs": flat, "first_call_s": setup[side]["first_call_s"]}
                self.ratios(times, row)
                row["load_average_1min_after"] = os.getloadavg()[0]
                rows.append(row)
                log(f"generate batch {b}: " + ", ".join(f"{side} {row[side]['tokens_per_s']:.1f} tok/s" for side in times)
                    + (f", ours / peer {row['ratio']:.2f}" if "ratio" in row else ""))
        finally:
            self.close(workers)
        return rows

    def moe(self, c: dict) -> dict:
        path = os.path.join(self.args.out_dir, f"moe_{self.args.name or self.args.preset}.json")
        cmd = [sys.executable, os.path.join(HERE, "bench_moe.py"), *c["args"], "--out", path]
        logf = os.path.join(self.logdir, "moe.log")
        with open(logf, "wb") as fh:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=thread_env(self.args.threads),
                                  timeout=self.args.setup_timeout, cwd=self.logdir)
        if proc.returncode != 0:
            raise WorkerError(f"bench_moe.py exited with {proc.returncode}; log {logf}\n{tail(logf)}")
        with open(path) as fh:
            result = json.load(fh)
        result["command"] = " ".join(os.path.relpath(a, ROOT) if a.startswith(ROOT) else a for a in cmd[1:])
        for r in result["rows"]:
            log(f"moe E={r['experts']} k={r['top_k']}: dense {r['dense_ms']:.1f} ms, MoE {r['moe_ms']:.1f} ms, "
                f"ratio {r['ratio']:.2f}")
        return result

    def compile(self, c: dict) -> list:
        """Compile time per depth, for each dropout of ``c['dropouts']``: with dropout 0 the identical layers share
        one parsed graph (``TransformerBlock``'s ``lazy_inline``), with dropout > 0 every layer is parsed on its own
        (a shared graph would repeat the first layer's dropout masks)."""
        rows = []
        runs = [(side, p, depth) for side in (("ours", "candidate") if self.args.candidate_root else ("ours",))
                for p in c.get("dropouts", (c["model"].get("dropout", 0.1),)) for depth in c["depths"]]
        for side, p, depth in runs:
            row = {"side": side, "layers": depth, "dropout": p, "hidden": c["model"]["hidden_size"],
                   "batch": c["batch"], "seq": c["seq"]}
            w = self.worker(side, f"compile{depth}")
            try:
                s = w.call("setup_compile", self.args.setup_timeout, model=dict(c["model"], dropout=p),
                           layers=depth, batch=c["batch"], seq=c["seq"])
                ts = w.call("run", self.args.run_timeout, n=c["steps"])["times"]
                step = statistics.median(ts)
                row.update(params=s["params"], first_step_s=s["first_step_s"], step_s=step,
                           compile_s=s["first_step_s"] - step, shared_layer_graph=s.get("shared_layer_graph"))
                log(f"compile {side} {depth} layers, dropout {p}: first step {s['first_step_s']:.1f} s, "
                    f"step {step:.2f} s, compile ~{row['compile_s']:.1f} s")
            except WorkerError as e:
                row["error"] = str(e)
                log(f"compile {side} {depth} layers failed: {last_error_line(str(e))}")
            finally:
                w.close()
            rows.append(row)
        return rows


def last_error_line(msg: str) -> str:
    """The exception line of a worker traceback (e.g. 'RuntimeError: Exceed function call depth limit 1000 ...')."""
    for line in msg.splitlines():
        if line.split(":", 1)[0].endswith(("Error", "Exception")) and not line.startswith(" "):
            return line.strip()[:240]
    return msg.strip().splitlines()[-1][:240] if msg.strip() else ""


# ----------------------------------------------------------------------------------------------- report
def fmt(x, spec=".1f", none="n/a"):
    return none if x is None else format(x, spec)


def pct(x):
    return "n/a" if not x else f"{100 * x:.1f}%"


def markdown(res: dict) -> str:
    m = res["machine"]
    v = res["versions"]
    lines = [f"# ms_llm benchmarks ({res['preset']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores ({m['isa']}), {fmt(m['memory_gib'])} GiB; "
             f"{m['threads']} compute threads on both sides; load average {m['load_average_start'][0]:.1f} at start, "
             f"{m['load_average_end'][0]:.1f} at end (other jobs share the machine: compare ratios, not absolutes).",
             f"Versions: MindSpore {v.get('ours', {}).get('mindspore', '?')} (numpy "
             f"{v.get('ours', {}).get('numpy', '?')}), peer torch {v.get('peer', {}).get('torch', 'n/a')} + "
             f"transformers {v.get('peer', {}).get('transformers', 'n/a')}; Python {v.get('ours', {}).get('python')}; "
             f"ms_llm commit {m['git_commit']}; {m['date']}.", ""]
    if res.get("peer_note"):
        lines += [f"**Peers:** {res['peer_note']}", ""]
    if res.get("candidate_root"):
        lines += [f"**Candidate:** a second ms_llm tree, `{res['candidate_root']}`, ran as a third side of the training, "
                  f"generation and compile cases, interleaved with this repo's ms_llm and the peer.", ""]
    mm = res.get("matmul")
    peak = None
    if isinstance(mm, dict) and "rows" in mm:
        peak = mm["peak_gflops"]
        lines += ["## fp32 matmul peak (MFU denominator)", "",
                  "| library | n | best GFLOPS | median GFLOPS |", "|---|---|---|---|"]
        lines += [f"| {r['lib']} | {r['n']} | {r['best_gflops']:.1f} | {r['median_gflops']:.1f} |" for r in mm["rows"]]
        lines += ["", f"Peak used for MFU: **{peak:.1f} GFLOPS** (best over libraries and sizes).", ""]
    elif mm:
        lines += ["## fp32 matmul peak", "", f"failed: {mm.get('error', '')[:300]}", ""]
    cand = bool(res.get("candidate_root"))
    cand_head = " candidate tok/s | candidate / HF | candidate / ms_llm |" if cand else ""
    tr = [(name, res[k]) for name, k in (("BERT encoder", "train_bert"), ("GPT-3 Small decoder", "train_gpt"))
          if k in res]
    if tr:
        lines += ["## Training step (float32, AdamW + clip, dropout on)", "",
                  "| model | layers x hidden | batch x seq | params | ms_llm tok/s | HF tok/s | ms_llm / HF | "
                  "ms_llm MFU | HF MFU | ms_llm first step s |" + cand_head,
                  "|---|---|---|---|---|---|---|---|---|---|" + "---|---|---|" * cand]
        for name, r in tr:
            if "ours" not in r:
                lines.append(f"| {name} | | | | failed: `{last_error_line(r.get('error', ''))}` | | | | | |")
                continue
            p = r.get("peer", {})
            line = (f"| {name} | {r['layers']} x {r['hidden']} | {r['batch']} x {r['seq']} | {r['params']:,} | "
                    f"{r['ours']['tokens_per_s']:.0f} | {fmt(p.get('tokens_per_s'), '.0f')} | "
                    f"**{fmt(r.get('ratio'), '.2f')}x** | {pct(r['ours'].get('mfu'))} | {pct(p.get('mfu'))} | "
                    f"{r['first_step_s']:.1f} |")
            if cand:
                cd = r.get("candidate", {})
                line += (f" {fmt(cd.get('tokens_per_s'), '.0f')} | {fmt(r.get('candidate_ratio'), '.2f')}x | "
                         f"{fmt(r.get('candidate_vs_ours'), '.2f')}x |")
            lines.append(line)
        lines += ["", "Tokens/s = batch x seq / median step time; MFU = tokens/s x training FLOPs per token / the "
                      "matmul peak above; ms_llm / HF = median over rounds of the paired tokens/s ratio.", ""]
    gen = res.get("generate")
    if gen:
        lines += ["## Generation with the KV cache (greedy, float32)", "",
                  "| layers | batch | prompt + new tokens | ms_llm tok/s | HF `generate` tok/s | ms_llm / HF |"
                  + (" candidate tok/s | candidate / ms_llm |" if cand else ""),
                  "|---|---|---|---|---|---|" + "---|---|" * cand]
        if isinstance(gen, dict):
            lines.append(f"| failed: `{last_error_line(gen.get('error', ''))}` | | | | | |")
        else:
            for r in gen:
                if "ours" not in r:
                    lines.append(f"| {r['layers']} | {r['batch']} | | failed: `{last_error_line(r.get('error', ''))}`"
                                 f" | | |")
                    continue
                p = r.get("peer", {})
                line = (f"| {r['layers']} | {r['batch']} | {r['prompt']} + {r['new_tokens']} | "
                        f"{r['ours']['tokens_per_s']:.1f} | {fmt(p.get('tokens_per_s'))} | "
                        f"**{fmt(r.get('ratio'), '.2f')}x** |")
                if cand:
                    line += (f" {fmt(r.get('candidate', {}).get('tokens_per_s'))} | "
                             f"{fmt(r.get('candidate_vs_ours'), '.2f')}x |")
                lines.append(line)
        lines += ["", "Tokens/s = batch x new tokens / median wall time of one `generate` call (prompt included).",
                  ""]
    moe = res.get("moe")
    if moe:
        lines += ["## MoE layer vs dense FFN of equal activated FLOPs (forward + backward)", ""]
        if "rows" in moe:
            r0 = moe["rows"][0]
            lines += [f"Hidden {r0['hidden']}, expert FFN {r0['expert_ffn']}, capacity factor 1.0, float32 (from "
                      f"`{moe.get('command', 'bench_moe.py')}`); the dense FFN has width top-k x expert FFN.", "",
                      "| experts | top-k | tokens | tokens / expert | dense ms | MoE ms | MoE / dense | reference "
                      "dispatch MoE / dense | reference routing MoE / dense | one-hot einsum MoE / dense |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            lines += [f"| {r['experts']} | {r['top_k']} | {r['tokens']} | {r['tokens_per_expert']} | "
                      f"{r['dense_ms']:.1f} | {r['moe_ms']:.1f} | **{r['ratio']:.2f}x** | "
                      f"{fmt(r.get('ratio_ref_dispatch'), '.2f')}x | {fmt(r.get('ratio_ref_routing'), '.2f')}x | "
                      f"{fmt(r.get('ratio_einsum'), '.2f')}x |" for r in moe["rows"]]
        else:
            lines.append(f"failed: {moe.get('error', '')[:300]}")
        lines.append("")
    comp = res.get("compile")
    if comp:
        lines += ["## Graph compile time vs depth (GPT train step: forward, backward, AdamW)", ""]
        if isinstance(comp, dict):
            lines.append(f"failed: {comp.get('error', '')[:300]}")
        else:
            lines += ["| ms_llm | dropout | layer graphs | layers | hidden | params | first step s | steady step s | "
                      "compile s (first - steady) |", "|---|---|---|---|---|---|---|---|---|"]
            for r in comp:
                who = r.get("side", "ours").replace("ours", "this repo")
                shared = {True: "one, shared", False: "one per layer", None: ""}[r.get("shared_layer_graph")]
                head = f"| {who} | {r.get('dropout', '')} | {shared} | {r['layers']} | {r['hidden']} |"
                if "error" in r:
                    lines.append(f"{head} | failed: `{last_error_line(r['error'])}` | | |")
                else:
                    lines.append(f"{head} {r['params']:,} | {r['first_step_s']:.1f} | {r['step_s']:.2f} | "
                                 f"{r['compile_s']:.1f} |")
            lines.append("")
            for side in ("ours", "candidate"):
                for p in sorted({r.get("dropout") for r in comp}, key=str):
                    ok = [r for r in comp if r.get("side", "ours") == side and r.get("dropout") == p
                          and "error" not in r]
                    if len(ok) == 2 and ok[0]["compile_s"] > 0:
                        lines.append(f"Compile time {ok[1]['layers']} / {ok[0]['layers']} layers "
                                     f"({side.replace('ours', 'this repo')}, dropout {p}): "
                                     f"**{ok[1]['compile_s'] / ok[0]['compile_s']:.2f}x** "
                                     f"(depth x{ok[1]['layers'] / ok[0]['layers']:.0f}).  ")
        lines.append("")
    lines += goals(res, peak)
    return "\n".join(lines) + "\n"


def goals(res: dict, peak) -> list:
    out = ["## Goals", "", "| goal | measured | met |", "|---|---|---|"]
    for key, name in (("train_bert", "training parity, BERT"), ("train_gpt", "training parity, GPT")):
        r = res.get(key)
        if r and r.get("ratio") is not None:
            out.append(f"| {name}: ms_llm / HF >= 1 | {r['ratio']:.2f}x | {'yes' if r['ratio'] >= 1 else 'no'} |")
    gen = res.get("generate")
    if isinstance(gen, list):
        for r in gen:
            if r.get("ratio") is not None:
                out.append(f"| generation parity, batch {r['batch']} | {r['ratio']:.2f}x | "
                           f"{'yes' if r['ratio'] >= 1 else 'no'} |")
    moe = res.get("moe")
    if moe and "rows" in moe:
        worst = max(r["ratio"] for r in moe["rows"])
        out.append(f"| MoE / dense <= 1.3 at equal activated FLOPs (default layer) | worst {worst:.2f}x | "
                   f"{'yes' if worst <= 1.3 else 'no'} |")
    mfus = [res[k]["ours"]["mfu"] for k in ("train_bert", "train_gpt")
            if k in res and "ours" in res[k] and res[k]["ours"].get("mfu")]
    if mfus:
        out.append(f"| largest shapes above 50% of the matmul peak | MFU {', '.join(f'{100 * x:.0f}%' for x in mfus)} "
                   f"| {'yes' if min(mfus) > 0.5 else 'no'} |")
    return out + [""] if len(out) > 4 else []


# ----------------------------------------------------------------------------------------------- main
def write(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as fh:
        fh.write(text)
    os.replace(path + ".tmp", path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="reduced depth and batch (same widths): ~10 minutes")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="compute threads of both sides")
    p.add_argument("--peer-python", default=DEFAULT_PEER if os.path.exists(DEFAULT_PEER) else None,
                   help=f"interpreter with torch + transformers (default {DEFAULT_PEER} if it exists)")
    p.add_argument("--only", default=",".join(SUITES), help=f"comma-separated subset of {','.join(SUITES)}")
    p.add_argument("--attention-impl", default="auto", choices=("auto", "reference", "fused"),
                   help="ms_llm's model.attention_impl for the training and generation cases (auto: fused on CPU)")
    p.add_argument("--ms-llm-root", default=None,
                   help="benchmark the ms_llm package of another source tree (e.g. a patched copy); default: this repo")
    p.add_argument("--candidate-root", default=None,
                   help="also run a second ms_llm source tree (e.g. with proposed fixes) as a third side of the "
                        "training and generation cases, interleaved with ours and the peer")
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--name", default=None, help="output file stem in --out-dir (default: quick / full)")
    p.add_argument("--setup-timeout", type=float, default=3600.0)
    p.add_argument("--run-timeout", type=float, default=3600.0)
    args = p.parse_args(argv)
    args.preset = "quick" if args.quick else "full"
    suites = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in suites if s not in SUITES]
    if bad:
        p.error(f"--only: unknown suite(s) {bad}; valid: {','.join(SUITES)}")
    if args.threads < 1:
        p.error("--threads must be >= 1")
    args.out_dir = os.path.abspath(args.out_dir)
    for k in ("ms_llm_root", "candidate_root"):
        if getattr(args, k):
            setattr(args, k, os.path.abspath(getattr(args, k)))
    os.makedirs(args.out_dir, exist_ok=True)
    c = preset(args.preset)
    runner = Runner(args)
    if runner.peer_note:
        log(runner.peer_note)
    res = {"preset": args.preset, "machine": machine_info(args.threads), "suites": suites,
           "ms_llm_root": args.ms_llm_root or ROOT, "candidate_root": args.candidate_root,
           "attention_impl": args.attention_impl, "presets": c}
    t_start = time.perf_counter()
    peak = None

    def attempt(key, fn, *a):
        try:
            res[key] = fn(*a)
        except (WorkerError, subprocess.TimeoutExpired, OSError) as e:
            res[key] = {"error": str(e)}
            log(f"{key} failed: {last_error_line(str(e))}")

    if "matmul" in suites:
        attempt("matmul", runner.matmul, c["matmul"])
        peak = res["matmul"].get("peak_gflops")
    if "train" in suites:
        attempt("train_bert", runner.train, "train_bert", c["train_bert"], peak)
        attempt("train_gpt", runner.train, "train_gpt", c["train_gpt"], peak)
    if "generate" in suites:
        attempt("generate", runner.generate, c["generate"])
    if "moe" in suites:
        attempt("moe", runner.moe, c["moe"])
    if "compile" in suites:
        attempt("compile", runner.compile, c["compile"])
    res["machine"]["load_average_end"] = os.getloadavg()
    res["versions"] = runner.versions
    res["peer_note"] = runner.peer_note
    res["wall_s"] = time.perf_counter() - t_start
    res["worker_logs"] = runner.logdir
    base = os.path.join(args.out_dir, args.name or args.preset)
    write(base + ".json", json.dumps(res, indent=2))         # the raw figures first: they survive a report bug
    md = markdown(res)
    write(base + ".md", md)
    print()
    print(md)
    log(f"wrote {base}.md and {base}.json in {res['wall_s'] / 60:.1f} min; worker logs in {runner.logdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
