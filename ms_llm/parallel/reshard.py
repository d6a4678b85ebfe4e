"""Re-shard distributed checkpoints between parallel layouts, and merge them into one file.

A distributed checkpoint is a folder with one sub-folder per rank, ``rank_<r>/<name>.ckpt`` (each rank's slices),
plus the strategy file of the layout that wrote it. Both operations run MindSpore's offline
``mindspore.parallel.transform_checkpoints`` (CPU is enough): re-sharding maps the slices of one strategy onto
another, merging maps them onto "no sharding" and keeps rank 0's complete file.
``ms-llm reshard`` is :func:`reshard_cli`.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import tempfile
from typing import List, Optional

from .strategy import strategy_device_num


def rank_dirs(ckpt_dir: str) -> List[int]:
    """Ranks that have a ``rank_<r>`` folder holding at least one checkpoint in ``ckpt_dir``."""
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"checkpoint folder not found: {ckpt_dir}")
    ranks = []
    for entry in os.listdir(ckpt_dir):
        m = re.fullmatch(r"rank_(\d+)", entry)
        if m and glob.glob(os.path.join(ckpt_dir, entry, "*.ckpt")) + \
                glob.glob(os.path.join(ckpt_dir, entry, "*.safetensors")):
            ranks.append(int(m.group(1)))
    return sorted(ranks)


def _check_source(src_ckpt_dir: str, src_strategy: Optional[str]) -> int:
    ranks = rank_dirs(src_ckpt_dir)
    if not ranks:
        raise ValueError(f"{src_ckpt_dir} has no rank_<r>/ folders with checkpoints")
    if src_strategy is None:
        if ranks != [0]:
            raise ValueError(f"{src_ckpt_dir} holds ranks {ranks} but no source strategy file was given")
        return 1
    if not os.path.isfile(src_strategy):
        raise FileNotFoundError(f"source strategy file not found: {src_strategy}")
    n = strategy_device_num(src_strategy)
    if ranks != list(range(n)):
        raise ValueError(f"{src_strategy} describes {n} ranks but {src_ckpt_dir} holds checkpoints of ranks {ranks}")
    return n


def reshard(src_ckpt_dir: str, src_strategy: Optional[str], dst_strategy: Optional[str], dst_dir: str,
            prefix: str = "checkpoint_", output_format: str = "ckpt") -> List[str]:
    """Write ``dst_dir/rank_<r>/<prefix><r>.<ext>`` for every rank of ``dst_strategy`` from the slices in
    ``src_ckpt_dir`` (layout ``src_strategy``). ``None`` as a strategy means unsharded (one complete file)."""
    _check_source(src_ckpt_dir, src_strategy)
    if dst_strategy is not None and not os.path.isfile(dst_strategy):
        raise FileNotFoundError(f"destination strategy file not found: {dst_strategy}")
    from mindspore.parallel import transform_checkpoints
    os.makedirs(dst_dir, exist_ok=True)
    transform_checkpoints(src_ckpt_dir, dst_dir, prefix, src_strategy, dst_strategy, output_format=output_format)
    n = strategy_device_num(dst_strategy) if dst_strategy is not None else 1
    ext = "safetensors" if output_format == "safetensors" else "ckpt"
    files = [os.path.join(dst_dir, f"rank_{r}", f"{prefix}{r}.{ext}") for r in range(n)]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise RuntimeError(f"transform_checkpoints did not write {missing}")
    return files


def merge(src_ckpt_dir: str, src_strategy: Optional[str], out_file: str) -> str:
    """Merge the slices in ``src_ckpt_dir`` (layout ``src_strategy``) into one complete checkpoint ``out_file``
    (``.ckpt``, or ``.safetensors`` by extension)."""
    fmt = "safetensors" if out_file.endswith(".safetensors") else "ckpt"
    out_dir = os.path.dirname(os.path.abspath(out_file))
    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=out_dir, prefix=".merge_")
    try:
        src_fmt = "safetensors" if glob.glob(os.path.join(src_ckpt_dir, "rank_*", "*.safetensors")) else "ckpt"
        if fmt == "safetensors" and src_fmt == "ckpt":
            raise ValueError("merging .ckpt slices writes a .ckpt file; name the output *.ckpt")
        (merged,) = reshard(src_ckpt_dir, src_strategy, None, tmp, prefix="merged_", output_format=fmt)
        os.replace(merged, out_file)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_file


def reshard_cli(argv: Optional[List[str]] = None) -> int:
    """``ms-llm reshard``: re-shard a distributed checkpoint to another layout, or merge it into one file."""
    p = argparse.ArgumentParser(prog="ms-llm reshard", description=reshard_cli.__doc__)
    p.add_argument("--src", required=True, help="folder with rank_<r>/ checkpoint slices")
    p.add_argument("--src-strategy", help="strategy file of the source layout (omit for one unsharded rank_0)")
    p.add_argument("--dst-strategy", help="strategy file of the destination layout")
    p.add_argument("--out", required=True, help="destination folder (re-shard) or file (--merge)")
    p.add_argument("--merge", action="store_true", help="merge into one complete checkpoint file --out")
    p.add_argument("--format", choices=("ckpt", "safetensors"), default="ckpt", help="re-shard output format")
    args = p.parse_args(argv)
    if args.merge:
        if args.dst_strategy:
            p.error("--merge writes one unsharded file; drop --dst-strategy")
        print(merge(args.src, args.src_strategy, args.out))
        return 0
    if not args.dst_strategy:
        p.error("re-sharding needs --dst-strategy (or pass --merge)")
    for f in reshard(args.src, args.src_strategy, args.dst_strategy, args.out, output_format=args.format):
        print(f)
    return 0
