"""`ms-llm` command line: train, evaluate, generate, convert, plan, reshard."""
from __future__ import annotations

import argparse
import os
import sys

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "configs", "gpt", "tiny.yaml")


def _context(device: str):
    import mindspore as ms
    ms.set_device(device)
    ms.set_context(mode=ms.GRAPH_MODE)


def cmd_train(args) -> int:
    from .config import load_config
    from .training.trainer import Trainer
    cfg = load_config(args.config, args.overrides)
    if args.output_dir:
        from .config.base import replace
        cfg = replace(cfg, train=replace(cfg.train, output_dir=args.output_dir))
    _context(args.device)
    from .parallel.context import setup as parallel_setup, strategy_file_in
    from .training.checkpointing import checkpoint_dir
    info = parallel_setup(cfg.parallel, args.device,
                          strategy_file=strategy_file_in(checkpoint_dir(cfg.train.output_dir)))
    Trainer(cfg, parallel_info=info).fit(resume=args.resume)
    return 0


def cmd_evaluate(args) -> int:
    from .config import load_config
    from .training import checkpointing
    from .training.tasks import build_task
    meta = checkpointing.latest(args.run_dir)
    if meta is None:
        raise SystemExit(f"no checkpoint in {args.run_dir}")
    cfg = load_config(os.path.join(os.path.dirname(meta["path"]), meta["file"][:-5] + ".yaml"), args.overrides)
    _context(args.device)
    task = build_task(cfg)
    checkpointing.load_model(meta, task.model)
    task.model.set_train(False)
    print(task.evaluate(task.model))
    return 0


def cmd_plan(args) -> int:
    import json
    from .config import load_config
    from .planner import format_report, plan_for_run
    cfg = load_config(args.model, args.overrides)
    fixed = {k: getattr(args, k) for k in ("dp", "tp", "pp", "ep", "micro_batch_size", "recompute")
             if getattr(args, k) is not None}
    report = plan_for_run(cfg, args.devices, args.device_type, top=args.top,
                          train_tokens=args.train_tokens, **fixed)
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    return 0


def cmd_generate(args) -> int:
    _context(args.device)
    from .generation import generate_cli
    generate_cli(args.checkpoint, args.prompt, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                 tokenizer=args.tokenizer)
    return 0


def cmd_convert(args) -> int:
    _context(args.device)
    from .checkpoint.hf import convert
    print(convert(args.input, args.output, args.to))
    return 0


def cmd_reshard(args) -> int:
    from .parallel.reshard import reshard_cli
    return reshard_cli(args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ms-llm", description="Train and run foundation-model architectures on "
                                "MindSpore (Ascend 910 clusters; every part also runs on a CPU).")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model from a YAML config (+ key.sub=value overrides)",
                       description="Train from a YAML config. Overrides like train.steps=100 model.dropout=0.0 "
                                   "apply on top; the resolved config is written beside every checkpoint.")
    t.add_argument("config", nargs="?", default=None, help="YAML config (default: the tiny GPT config)")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.output_dir")
    t.add_argument("--output-dir", default=None, help="shortcut for train.output_dir=...")
    t.add_argument("--device", default="CPU", choices=("CPU", "Ascend"), help="device target (default CPU)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="evaluate the newest checkpoint of a run directory")
    e.add_argument("run_dir", help="train.output_dir of a run")
    e.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    e.add_argument("--device", default="CPU", choices=("CPU", "Ascend"))
    e.set_defaults(func=cmd_evaluate)

    g = sub.add_parser("generate", help="generate text with a KV cache from a trained or converted decoder",
                       description="Load an ms_llm run directory (from `ms-llm train` on a causal_lm task) or a "
                                   "Hugging Face GPT-2 / Llama directory and continue a prompt; greedy by default.")
    g.add_argument("--checkpoint", required=True, help="ms_llm run directory or Hugging Face directory")
    g.add_argument("--prompt", default="", help="text to continue")
    g.add_argument("--max-new-tokens", type=int, default=50)
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--tokenizer", default=None, help="tokenizer file/folder (default: the one saved with the run)")
    g.add_argument("--device", default="CPU", choices=("CPU", "Ascend"))
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("convert", help="convert weights: Hugging Face directory <-> ms_llm run directory",
                       description="--to ms: a Hugging Face directory (config.json + model.safetensors; BERT, GPT-2, "
                                   "Llama, Switch) becomes an ms_llm directory (checkpoint + config). --to hf: an "
                                   "ms_llm run directory becomes a Hugging Face directory. Both round-trip exactly.")
    c.add_argument("input", help="source directory")
    c.add_argument("output", help="destination directory")
    c.add_argument("--to", required=True, choices=("ms", "hf"), help="target layout")
    c.add_argument("--device", default="CPU", choices=("CPU", "Ascend"))
    c.set_defaults(func=cmd_convert)

    pl = sub.add_parser("plan", help="plan a distributed run: memory, FLOPs, communication, time per layout",
                        description="Enumerate feasible (dp, tp, pp, ep) layouts for --devices devices of "
                                    "--device-type, rank them by predicted step time, and explain the best: "
                                    "time = data x per-step compute / (device rate x devices x parallel efficiency).")
    pl.add_argument("--model", required=True, help="YAML run config (model + data.seq_length + train.batch_size)")
    pl.add_argument("overrides", nargs="*", help="key.sub=value overrides of the config")
    pl.add_argument("--devices", type=int, required=True, help="number of devices")
    pl.add_argument("--device-type", default="910B", help="device in ms_llm/planner/devices.yaml (910A, 910B, A100...)")
    pl.add_argument("--top", type=int, default=5, help="layouts to list")
    pl.add_argument("--train-tokens", type=float, default=None, help="tokens to train on (adds total time)")
    for k in ("dp", "tp", "pp", "ep", "micro_batch_size"):
        pl.add_argument(f"--{k.replace('_', '-')}", dest=k, type=int, default=None, help=f"hold {k} fixed")
    pl.add_argument("--recompute", choices=("none", "selective", "full"), default=None, help="hold recompute fixed")
    pl.add_argument("--json", action="store_true", help="print JSON instead of text")
    pl.set_defaults(func=cmd_plan)

    r = sub.add_parser("reshard", help="re-shard or merge distributed checkpoints between parallel layouts",
                       add_help=False, description="see `ms-llm reshard --help`")
    r.add_argument("rest", nargs=argparse.REMAINDER)
    r.set_defaults(func=cmd_reshard)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = getattr(args, "config", "unset")
    if config is not None and config != "unset" and "=" in config and not os.path.exists(config):
        args.overrides = [config] + list(args.overrides)    # `ms-llm train key=value ...`: overrides only
        config = None
    if config is None:
        args.config = os.path.normpath(DEFAULT_CONFIG)
    from .config import ConfigError
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
