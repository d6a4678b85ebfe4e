"""Helpers shared by the msrun worker scripts and the tests that check their results (no MindSpore at import)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
WORKERS = os.path.dirname(os.path.abspath(__file__))


def set_weights(cell, seed: int, std: float = 0.2) -> dict:
    """Give every trainable parameter of ``cell`` seeded normal values (sorted by name); returns name -> array."""
    from mindspore import Tensor
    rng = np.random.default_rng(seed)
    values = {}
    for p in sorted(cell.trainable_params(), key=lambda q: q.name):
        values[p.name] = rng.normal(0.0, std, tuple(p.shape)).astype(np.float32)
        p.set_data(Tensor(values[p.name]))
    return values


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def msrun(script: str, nproc: int, log_dir: str, args=(), timeout: int = 240, cluster_time_out: int = 90):
    """Run ``script`` under msrun with ``nproc`` local workers (venv's bin first on PATH); raise with the worker
    logs on failure. Returns the wall time in seconds."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("GLOG_v", "3")
    cmd = ["timeout", str(timeout), "msrun", f"--worker_num={nproc}", f"--local_worker_num={nproc}",
           f"--master_port={free_port()}", f"--log_dir={log_dir}", "--join=True",
           f"--cluster_time_out={cluster_time_out}", script, *map(str, args)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=log_dir)
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        logs = []
        for name in sorted(os.listdir(log_dir)):
            if name.startswith("worker_") and name.endswith(".log"):
                with open(os.path.join(log_dir, name), errors="replace") as f:
                    lines = [l for l in f.read().splitlines() if "[WARNING]" not in l and "[INFO]" not in l]
                logs.append(f"--- {name} ---\n" + "\n".join(lines[-40:]))
        raise RuntimeError(f"msrun failed (exit {proc.returncode}) after {took:.0f}s: {' '.join(cmd)}\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}\n" + "\n".join(logs))
    return took
