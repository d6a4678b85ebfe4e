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
    from .parallel.context import setup as parallel_setup
    parallel_setup(cfg.parallel, args.device)
    Trainer(cfg).fit(resume=args.resume)
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
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", "unset") is None:
        args.config = os.path.normpath(DEFAULT_CONFIG)
    from .config import ConfigError
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
