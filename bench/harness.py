"""Plumbing shared by the runner and the two workers (standard library only: both virtualenvs import it).

A worker is a long-lived subprocess (``worker_ms.py`` in the repo venv, ``worker_hf.py`` in the peer venv) that
builds one benchmark case, compiles and warms it up, then times ``n`` runs each time the runner asks. Commands are
JSON lines on the worker's stdin; replies are JSON lines on a dedicated pipe (``--reply-fd``), so that whatever
MindSpore or PyTorch print on stdout/stderr (collected in a log file) can never corrupt the protocol. Only one worker
computes at any moment (the other waits on its stdin), which is what lets the runner interleave ours and the peer's
runs round by round on a shared, noisy machine.
"""
from __future__ import annotations

import json
import os
import select
import signal
import statistics
import subprocess
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def thread_env(threads: int) -> Dict[str, str]:
    """Environment of a worker pinned to ``threads`` compute threads (OpenMP, MKL, OpenBLAS), logging quiet."""
    env = dict(os.environ)
    for k in THREAD_ENV:
        env[k] = str(threads)
    env["GLOG_v"] = "3"                       # MindSpore: errors only
    env["TRANSFORMERS_VERBOSITY"] = "error"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONUNBUFFERED"] = "1"
    return env


# ----------------------------------------------------------------------------------------------- worker side
def serve(handlers: Dict[str, Callable[..., dict]]) -> None:
    """Worker main loop: ``{"cmd": name, ...kwargs}`` lines on stdin -> ``handlers[name](**kwargs)`` -> a JSON reply
    ``{"ok": true, ...result}`` (or ``{"ok": false, "error": traceback}``) on the ``--reply-fd`` pipe. ``quit`` ends."""
    fd = int(sys.argv[sys.argv.index("--reply-fd") + 1])
    reply = os.fdopen(fd, "w", buffering=1)
    for line in sys.stdin:
        msg = json.loads(line)
        cmd = msg.pop("cmd")
        if cmd == "quit":
            break
        try:
            out = {"ok": True, **handlers[cmd](**msg)}
        except Exception:                                   # reported to the runner, which records the failure
            out = {"ok": False, "error": traceback.format_exc()}
        reply.write(json.dumps(out) + "\n")
        reply.flush()
    reply.close()


def time_calls(fn: Callable[[], object], n: int) -> List[float]:
    """Wall-clock seconds of ``n`` calls of ``fn`` (which must synchronise: return host values)."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


# ----------------------------------------------------------------------------------------------- runner side
class WorkerError(RuntimeError):
    pass


class Worker:
    """A worker subprocess: ``call(cmd, timeout, **kwargs) -> dict``; ``close()`` ends it (only this process)."""

    def __init__(self, name: str, argv: List[str], threads: int, log_path: str):
        """``log_path``'s folder is also the worker's working directory (MindSpore writes rank_0/ and
        analyze_fail.ir files into the working directory; they must not land in the repo)."""
        self.name = name
        self.log_path = log_path
        r, w = os.pipe()
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(argv + ["--reply-fd", str(w)], stdin=subprocess.PIPE, stdout=self._log,
                                     stderr=subprocess.STDOUT, env=thread_env(threads), pass_fds=(w,),
                                     start_new_session=True, cwd=os.path.dirname(os.path.abspath(log_path)))
        os.close(w)
        self._reply = os.fdopen(r, "r")

    def call(self, cmd: str, timeout: float, **kwargs) -> dict:
        if self.proc.poll() is not None:
            raise WorkerError(f"{self.name} worker exited with code {self.proc.returncode}; log: {self.log_path}")
        self.proc.stdin.write((json.dumps({"cmd": cmd, **kwargs}) + "\n").encode())
        self.proc.stdin.flush()
        ready, _, _ = select.select([self._reply], [], [], timeout)
        if not ready:
            self.kill()
            raise WorkerError(f"{self.name} worker: '{cmd}' did not answer within {timeout:.0f} s (killed); "
                              f"log: {self.log_path}")
        line = self._reply.readline()
        if not line:
            code = self.proc.wait(timeout=30)
            raise WorkerError(f"{self.name} worker died during '{cmd}' (exit code {code}); log: {self.log_path}\n"
                              + tail(self.log_path))
        out = json.loads(line)
        if not out.pop("ok"):
            raise WorkerError(f"{self.name} worker: '{cmd}' failed:\n{out['error']}")
        return out

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)      # the worker's own session: it and its children only
            self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(b'{"cmd": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()
        self._reply.close()
        self._log.close()


def tail(path: str, lines: int = 25) -> str:
    try:
        with open(path, errors="replace") as fh:
            return "".join(fh.readlines()[-lines:])
    except OSError:
        return ""


def median(xs: List[float]) -> Optional[float]:
    return statistics.median(xs) if xs else None
