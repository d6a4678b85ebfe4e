"""Where one ms_llm training step spends its time, next to the same step in Hugging Face / PyTorch.

    python bench/profile_step.py --arch gpt --quick          # GPT-3 Small widths, 2 layers, batch 1 x 512
    python bench/profile_step.py --arch bert                 # BERT-base, batch 8 x 128

Three views of the step of bench/run_all.py's training case (same shapes, threads and dtype on both sides):
1. wall-clock parts, interleaved with the peer: forward (ms_llm: the loss cell alone, in its own graph),
   forward + backward (ms_llm: TrainStep's accumulate graph), update (clip + AdamW + zeroing);
2. MindSpore's profiler (``mindspore.profiler.profile``, CPU activity) over the whole step: op time by component
   (forward / backward / AdamW / step plumbing), by module, by op type, and the largest single ops;
3. ``torch.profiler`` self time by aten op for the peer, so matmul time and everything-else time compare directly.

Writes bench/results/profile_<arch>_<preset>.md and .json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from cases import preset                                                      # noqa: E402
from harness import Worker, WorkerError                                       # noqa: E402
from run_all import DEFAULT_PEER, log, machine_info                           # noqa: E402


def main(argv=None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--render":      # re-render a saved JSON
        with open(sys.argv[2]) as fh:
            res = json.load(fh)
        with open(sys.argv[2][:-5] + ".md", "w") as fh:
            fh.write(report(res))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", choices=("gpt", "bert"), default="gpt")
    p.add_argument("--quick", action="store_true", help="the --quick shapes of run_all.py")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the wall-clock breakdown")
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument("--peer-python", default=DEFAULT_PEER if os.path.exists(DEFAULT_PEER) else None)
    p.add_argument("--attention-impl", default="auto", choices=("auto", "reference", "fused"))
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    args = p.parse_args(argv)
    name = "quick" if args.quick else "full"
    c = preset(name)[f"train_{args.arch}"]
    logdir = tempfile.mkdtemp(prefix="ms_llm_profile_")
    kw = dict(arch=args.arch, model=c["model"], batch=c["batch"], seq=c["seq"], warmup=2,
              attention_impl=args.attention_impl)
    workers = {"ours": Worker("ours", [sys.executable, os.path.join(HERE, "worker_ms.py"), "--threads",
                                       str(args.threads)], args.threads, os.path.join(logdir, "ours.log"))}
    if args.peer_python and os.path.exists(args.peer_python):
        workers["peer"] = Worker("peer", [args.peer_python, os.path.join(HERE, "worker_hf.py"), "--threads",
                                          str(args.threads)], args.threads, os.path.join(logdir, "peer.log"))
    else:
        log(f"peer interpreter {args.peer_python} not found: ms_llm only")
    res = {"arch": args.arch, "preset": name, "shape": {k: c[k] for k in ("batch", "seq")}, "model": c["model"],
           "machine": machine_info(args.threads), "attention_impl": args.attention_impl}
    try:
        for side, w in list(workers.items()):
            try:
                res[f"{side}_setup"] = w.call("setup_train", 7200, **kw)
                log(f"{side}: set up, first step {res[f'{side}_setup']['first_step_s']:.1f} s")
            except WorkerError as e:
                if side == "ours":
                    raise
                log(f"peer failed: {e}")
                workers.pop(side).close()
        parts = {side: [] for side in workers}
        for r in range(args.rounds):
            for side in (list(workers) if r % 2 == 0 else list(workers)[::-1]):
                parts[side].append(workers[side].call("breakdown", 7200, n=2)["parts"])
        res["breakdown"] = {side: {k: statistics.median(p[k] for p in ps) for k in ps[0]}
                            for side, ps in parts.items()}
        log(f"breakdown: {res['breakdown']}")
        res["ms_profile"] = workers["ours"].call("profile", 7200, steps=args.profile_steps,
                                                 out_dir=os.path.join(logdir, "ms_trace"))
        if "peer" in workers:
            res["torch_profile"] = workers["peer"].call("profile", 7200, steps=args.profile_steps)
    finally:
        for w in workers.values():
            w.close()
    res["machine"]["load_average_end"] = os.getloadavg()
    md = report(res)
    os.makedirs(args.out_dir, exist_ok=True)
    base = os.path.join(args.out_dir, f"profile_{args.arch}_{name}")
    for path, text in ((base + ".json", json.dumps(res, indent=2)), (base + ".md", md)):
        with open(path + ".tmp", "w") as fh:
            fh.write(text)
        os.replace(path + ".tmp", path)
    print(md)
    log(f"wrote {base}.md / .json; MindSpore trace in {res['ms_profile']['trace_dir']}")
    return 0


def report(res: dict) -> str:
    m, s = res["machine"], res["shape"]
    mc = res["model"]
    lines = [f"# Profile of one training step: {res['arch']} ({res['preset']}: {mc['num_layers']} layers x "
             f"{mc['hidden_size']}, vocab {mc['vocab_size']}, batch {s['batch']} x {s['seq']}, float32)", "",
             f"{m['cpu']}, {m['cores']} cores, {m['threads']} threads; load average {m['load_average_start'][0]:.1f}"
             f" -> {m['load_average_end'][0]:.1f}; {m['date']}.", "",
             "## Wall-clock parts (median of interleaved rounds, seconds)", ""]
    b = res["breakdown"]
    sides = list(b)
    lines += ["| part | " + " | ".join({"ours": "ms_llm", "peer": "HF / PyTorch"}[x] for x in sides) + " |",
              "|---|" + "---|" * len(sides)]
    for part in ("forward", "forward_backward", "update"):
        lines.append(f"| {part.replace('_', ' + ')} | " + " | ".join(f"{b[x][part]:.3f}" for x in sides) + " |")
    lines += ["", "ms_llm's forward is the loss cell compiled alone; forward + backward is TrainStep's accumulate "
              "graph (it also adds the gradients into the accumulation buffers); update is its apply graph "
              "(unscale, global-norm clip, AdamW, zero the buffers). HF: forward, backward, then clip_grad_norm_ + "
              "AdamW.step + zero_grad.", ""]
    mp = res["ms_profile"]
    tp = res.get("torch_profile")
    lines += ["## Op time (profilers, ms per step)", "",
              "| | ms_llm (MindSpore profiler) | HF (torch.profiler, self time) |", "|---|---|---|",
              f"| all ops | {mp['op_total_ms']:.0f} | {tp['op_total_ms']:.0f} |" if tp else
              f"| all ops | {mp['op_total_ms']:.0f} | n/a |",
              f"| matmuls | {mp['matmul_ms']:.0f} ({100 * mp['matmul_ms'] / mp['op_total_ms']:.0f}%) | "
              + (f"{tp['matmul_ms']:.0f} ({100 * tp['matmul_ms'] / tp['op_total_ms']:.0f}%) |" if tp else "n/a |"),
              f"| everything else | {mp['op_total_ms'] - mp['matmul_ms']:.0f} | "
              + (f"{tp['op_total_ms'] - tp['matmul_ms']:.0f} |" if tp else "n/a |"), ""]
    lines += ["### ms_llm by component", "", "| component | ms | share |", "|---|---|---|"]
    lines += [f"| {k} | {v:.0f} | {100 * v / mp['op_total_ms']:.0f}% |" for k, v in mp["by_component"].items()]
    lines += ["", "### ms_llm forward by module", "", "| module | ms |", "|---|---|"]
    lines += [f"| {k.split(': ', 1)[1]} | {v:.0f} |" for k, v in mp["by_module"].items() if k.startswith("forward")]
    lines += ["", "(Backward ops carry the scope of the top-level cell, not of the layer they differentiate, so the "
                  "backward is not split by module.)"]
    lines += ["", "### ms_llm by op type (top 15)", "", "| op | ms | share |", "|---|---|---|"]
    lines += [f"| {k} | {v:.0f} | {100 * v / mp['op_total_ms']:.0f}% |" for k, v in list(mp["by_type"].items())[:15]]
    if tp:
        lines += ["", "### HF / PyTorch by aten op (top 15, self time)", "", "| op | ms | share |", "|---|---|---|"]
        lines += [f"| {k} | {v:.0f} | {100 * v / tp['op_total_ms']:.0f}% |"
                  for k, v in list(tp["by_type"].items())[:15]]
    lines += ["", "### ms_llm largest single ops", "", "| ms | op (scope) |", "|---|---|"]
    lines += [f"| {t['ms']:.1f} | `{t['op']}` |" for t in mp["top_ops"][:15]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
