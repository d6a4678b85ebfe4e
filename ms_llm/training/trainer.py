"""The training loop: progress, metrics, evaluation, checkpoints, resume, loss curve.

Progress lines report step, loss, learning rate, tokens/s and MFU = flops_per_token x tokens/s / device peak
(``train.peak_tflops``, or the fp32 matmul peak of this machine measured at start-up when it is 0).
"""
from __future__ import annotations

import json
import os
import time
from typing import Dict, List, Optional

import numpy as np
import mindspore as ms
from mindspore import Tensor

from ..config import RunConfig, dump_config
from . import checkpointing
from .optim import lr_at
from .step import TrainStep
from .tasks import build_task


def measure_matmul_tflops(n: int = 1024, repeats: int = 5) -> float:
    """fp32 matmul throughput of this machine through MindSpore (TFLOPS), the MFU denominator on CPU."""
    a = Tensor(np.random.default_rng(0).standard_normal((n, n)).astype(np.float32))
    ms.ops.matmul(a, a).asnumpy()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        ms.ops.matmul(a, a).asnumpy()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e12


def split_micro_batches(batch, k: int):
    """(global batch arrays) -> k tuples of micro-batch arrays along axis 0."""
    n = batch[0].shape[0]
    if n % k:
        raise ValueError(f"batch of {n} cannot be split into {k} micro-batches")
    m = n // k
    return [tuple(a[i * m:(i + 1) * m] for a in batch) for i in range(k)]


def plot_losses(records: List[dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [r["step"] for r in records if "loss" in r]
    losses = [r["loss"] for r in records if "loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, lw=1.2, label="train loss")
    evals = [r for r in records if "eval" in r and "loss" in r["eval"]]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval"]["loss"] for r in evals], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


class Trainer:
    """Runs ``cfg`` to completion; ``fit(resume)`` returns the final evaluation metrics."""

    def __init__(self, cfg: RunConfig, log=print, parallel_info=None):
        """``parallel_info``: from :func:`ms_llm.parallel.context.setup` (None = one stand-alone process)."""
        self.cfg = cfg
        self.info = parallel_info
        self.is_main = parallel_info is None or parallel_info.rank == 0
        self.log = log if self.is_main else (lambda *a, **k: None)

    def fit(self, resume: bool = False) -> Dict[str, float]:
        cfg, t = self.cfg, self.cfg.train
        out = t.output_dir
        os.makedirs(out, exist_ok=True)
        ms.set_seed(t.seed)
        np.random.seed(t.seed)
        task = build_task(cfg)
        model = task.model
        if t.init_from and task.initialized_from != t.init_from:
            meta = checkpointing.latest(t.init_from)
            if meta is None:
                raise ValueError(f"train.init_from: {t.init_from} holds no ms_llm checkpoint, and task "
                                 f"'{cfg.data.task}' does not load Hugging Face directories")
            checkpointing.load_model(meta, model)
            self.log(f"initialised weights from {meta['path']}")
        model.set_train(True)
        dynamic = cfg.model.compute_dtype == "float16"
        loss_net, make_reducer, local = task.loss_net, None, (lambda b: b)
        if self.info is not None:
            from ..parallel.prepare import grad_reducer, prepare
            prepared = prepare(model, task.loss_net, cfg.parallel, self.info)
            loss_net, local = prepared.loss_net, self.info.local_batch
            make_reducer = lambda bufs, params: grad_reducer(bufs, params, self.info, prepared)  # noqa: E731
        trainable = [p for p in model.trainable_params()]   # after prepare: expert weights may be sliced
        step_fn = TrainStep(loss_net, trainable, t, dynamic_scale=dynamic, make_reducer=make_reducer)
        start = 0
        metrics_path = os.path.join(out, "metrics.jsonl")
        if resume:
            meta = checkpointing.latest(out)
            if meta is None:
                raise ValueError(f"--resume: no checkpoint in {out}")
            start = checkpointing.load(meta, model, step_fn.state_parameters())
            self.log(f"resumed from {meta['path']} at step {start}")
        elif os.path.exists(metrics_path) and self.is_main:
            os.remove(metrics_path)
        if not self.is_main:   # data-parallel ranks > 0 train in step with rank 0 but write nothing
            metrics_path = os.devnull
        else:
            dump_config(cfg, os.path.join(out, "config.yaml"))
        records = self._read_records(metrics_path, start) if self.is_main else []
        peak = t.peak_tflops or measure_matmul_tflops()
        n_params = sum(int(np.prod(p.shape)) for p in trainable)
        self.log(f"model {cfg.model.arch}: {n_params:,} trainable parameters; task {cfg.data.task}; "
                 f"steps {start}->{t.steps}; batch {t.batch_size} ({t.grad_accum_steps} micro-batches); "
                 f"peak {peak:.3f} TFLOPS ({'config' if t.peak_tflops else 'measured fp32 matmul'})")
        batches = task.batches(start)
        bar = None
        if t.progress_bar and self.is_main:
            from tqdm import tqdm
            bar = tqdm(total=t.steps, initial=start, desc="train", dynamic_ncols=True, mininterval=1.0)
        window_t0, window_tokens, compile_s = time.perf_counter(), 0, None
        with open(metrics_path, "a") as mf:
            for step in range(start, t.steps):
                batch = next(batches)
                lr = lr_at(step, t, cfg.model.hidden_size)
                t0 = time.perf_counter()
                loss, finite, norm, scale = step_fn.step(split_micro_batches(local(batch), t.grad_accum_steps), lr)
                if compile_s is None:
                    compile_s = time.perf_counter() - t0
                    window_t0, window_tokens = time.perf_counter(), 0
                else:
                    window_tokens += task.tokens_per_batch
                if not np.isfinite(loss) and not dynamic:
                    raise FloatingPointError(f"loss is {loss} at step {step + 1}")
                rec = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": norm, "loss_scale": scale,
                       "overflow": not finite}
                if (step + 1) % t.log_every == 0 or step + 1 == t.steps:
                    dt = time.perf_counter() - window_t0
                    tps = window_tokens / dt if window_tokens and dt > 0 else 0.0
                    mfu = task.flops_per_token * tps / (peak * 1e12) if peak else 0.0
                    rec.update(tokens_per_s=tps, mfu=mfu)
                    if task.log_metrics is not None:
                        rec.update(task.log_metrics(model, batch))
                    line = (f"step {step + 1}/{t.steps} loss {loss:.4f} lr {lr:.2e} |g| {norm:.3f} "
                            f"tok/s {tps:,.0f} MFU {100 * mfu:.1f}%")
                    if dynamic:
                        line += f" scale {scale:g}"
                    (bar.write if bar else self.log)(line)
                    window_t0, window_tokens = time.perf_counter(), 0
                if t.eval_every and (step + 1) % t.eval_every == 0 and step + 1 < t.steps:
                    ev = task.evaluate(model)
                    model.set_train(True)
                    rec["eval"] = ev
                    (bar.write if bar else self.log)(f"eval @ {step + 1}: " + _fmt(ev))
                records.append(rec)
                mf.write(json.dumps(rec) + "\n")
                mf.flush()
                if bar:
                    bar.set_postfix(loss=f"{loss:.3f}")
                    bar.update(1)
                if t.save_every and (step + 1) % t.save_every == 0 and step + 1 < t.steps and self.is_main:
                    checkpointing.save(out, step + 1, model, step_fn.state_parameters(), cfg, t.keep_checkpoints)
            if bar:
                bar.close()
            final = task.evaluate(model)
            model.set_train(True)
            rec = {"step": t.steps, "eval": final, "compile_s": compile_s}
            records.append(rec)
            mf.write(json.dumps(rec) + "\n")
        self.task = task
        if not self.is_main:
            return final
        path = checkpointing.save(out, t.steps, model, step_fn.state_parameters(), cfg, t.keep_checkpoints)
        plot_losses(records, os.path.join(out, "loss_curve.png"), f"{cfg.model.arch} / {cfg.data.task}")
        self.log(f"final eval: {_fmt(final)}")
        self.log(f"checkpoint: {path}\nmetrics: {metrics_path}\nloss curve: {os.path.join(out, 'loss_curve.png')}")
        if task.sample is not None:
            model.set_train(False)
            self.log(task.sample(model))
        return final

    @staticmethod
    def _read_records(path: str, start: int) -> List[dict]:
        """Metric records of steps up to ``start`` (a resumed run keeps the history it continues)."""
        if not start or not os.path.exists(path):
            return []
        kept = []
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                if r.get("step", 0) <= start and "compile_s" not in r:
                    kept.append(r)
        with open(path + ".tmp", "w") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
        os.replace(path + ".tmp", path)
        return kept


def _fmt(metrics: Dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
