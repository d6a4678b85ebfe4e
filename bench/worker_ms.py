"""ms_llm side of the benchmarks: a worker process (see harness.py) run with the repo's venv.

    python bench/worker_ms.py --threads 2 --reply-fd FD [--ms-llm-root DIR]   # started by run_all.py

Cases (``setup_*`` builds, compiles and warms up; ``run`` times ``n`` more calls):
- ``train``: one optimizer step of ``TrainStep`` (AdamW with bias correction, weight decay 0.01, global-norm clip 1.0,
  float32) on BERT (``BertForSequenceClassification`` + ``BertClassificationLoss``) or GPT (``GPTLMHeadModel`` +
  ``CausalLMLoss``), GRAPH_MODE, dropout on (train mode);
- ``generate``: ``ms_llm.generation.generate``, greedy, ``new_tokens`` tokens (no stop token) after a random prompt;
- ``matmul``: an (n, n) @ (n, n) float32 product through MindSpore (PyNative ``ops.matmul``) or numpy;
- ``compile``: the first training step of a GPT of a given depth (graph compilation + one step).
"""
from __future__ import annotations

import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if "--ms-llm-root" in sys.argv:                   # benchmark another source tree's ms_llm (e.g. a patched copy)
    ROOT = os.path.abspath(sys.argv[sys.argv.index("--ms-llm-root") + 1])
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np                                                            # noqa: E402

from harness import serve, time_calls                                         # noqa: E402

STATE = {}


def _init(threads: int) -> None:
    import mindspore as ms
    ms.set_device("CPU")
    ms.device_context.cpu.op_tuning.threads_num(threads)       # CPU kernel threads (MindSpore's default is 25)
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_seed(0)


def _model_cfg(arch: str, model: dict, attention_impl: str):
    from ms_llm.config import ModelConfig
    if arch == "bert":
        return ModelConfig(arch="bert", pre_norm=False, position_embedding="learned", attention_impl=attention_impl,
                           **model)
    return ModelConfig(arch="gpt", pre_norm=True, position_embedding="learned", tie_word_embeddings=True,
                       attention_impl=attention_impl, **model)


def _train_step(arch: str, cfg, batch: int, seq: int):
    """(step function, flops per token, trainable parameter count)."""
    import mindspore as ms
    from ms_llm.config import TrainConfig
    from ms_llm.training.step import TrainStep
    rng = np.random.default_rng(0)
    if arch == "bert":
        from ms_llm.models.bert import BertClassificationLoss, BertForSequenceClassification, bert_flops_per_token
        model = BertForSequenceClassification(cfg)
        loss_net = BertClassificationLoss(model)
        ids = rng.integers(1, cfg.vocab_size, (batch, seq)).astype(np.int32)
        types = np.zeros((batch, seq), np.int32)
        types[:, seq // 2:] = 1
        data = (ids, types, np.ones((batch, seq), np.int32), rng.integers(0, 2, (batch,)).astype(np.int32))
        flops = bert_flops_per_token(cfg, seq, predictions_per_token=0.0)
    else:
        from ms_llm.data.causal_lm import CausalLMLoss, gpt_flops_per_token
        from ms_llm.models.gpt import GPTLMHeadModel
        model = GPTLMHeadModel(cfg)
        loss_net = CausalLMLoss(model)
        tokens = rng.integers(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
        data = (tokens[:, :-1], tokens[:, 1:])
        flops = gpt_flops_per_token(cfg, seq)
    model.set_train(True)
    params = model.trainable_params()
    step = TrainStep(loss_net, params, TrainConfig(batch_size=batch, lr=1e-4, weight_decay=0.01, grad_clip=1.0),
                     dynamic_scale=False)
    n_params = sum(int(np.prod(p.shape)) for p in params)

    def run():
        loss, finite, _, _ = step.step([data], 1e-4)
        if not (finite and np.isfinite(loss)):
            raise FloatingPointError(f"non-finite training step (loss {loss})")
        return loss
    STATE.update(train_step=step, loss_net=loss_net, data=data)
    return run, flops, n_params


def setup_train(arch: str, model: dict, batch: int, seq: int, warmup: int, attention_impl: str = "auto"):
    cfg = _model_cfg(arch, model, attention_impl)
    t0 = time.perf_counter()
    run, flops, n_params = _train_step(arch, cfg, batch, seq)
    build_s = time.perf_counter() - t0
    first = time_calls(run, 1)[0]
    time_calls(run, max(0, warmup - 1))
    STATE["run"] = run
    return {"build_s": build_s, "first_step_s": first, "flops_per_token": flops, "params": n_params,
            "tokens_per_step": batch * seq}


def breakdown(n: int):
    """Median seconds of the parts of the training step set up last: ``forward`` (the loss cell alone, its own
    graph), ``forward_backward`` (the accumulate graph: loss, gradients, add into the accumulation buffers) and
    ``update`` (the apply graph: unscale, global-norm clip, AdamW, zero the buffers), over ``n`` runs after one
    warm-up call of each."""
    import mindspore as ms
    from mindspore import Tensor
    step, loss_net = STATE["train_step"], STATE["loss_net"]
    batch = [Tensor(a) for a in STATE["data"]]
    lr = Tensor(1e-4, ms.float32)
    parts = {"forward": lambda: loss_net(*batch).asnumpy(),
             "forward_backward": lambda: step.accumulate(*batch).asnumpy(),
             "update": lambda: step.apply(lr)[1].asnumpy()}
    out = {}
    for name, fn in parts.items():
        time_calls(fn, 1)
        out[name] = statistics.median(time_calls(fn, n))
    return {"parts": out}


MATMUL_OPS = ("MatMul", "BatchMatMul", "MatMulExt", "BatchMatMulExt", "Dense")
# (component, predicate on the op's full scope name), first match wins
COMPONENTS = (
    ("update: AdamW", lambda n: "optimizer-AdamW" in n),
    ("backward", lambda n: n.startswith("Gradients/")),
    ("forward", lambda n: n.startswith("Default/loss_net") or n.startswith("Default/network")),
    ("step plumbing: accumulate, unscale, clip, zero", lambda n: True),
)
MODULES = (
    ("attention core", ("core-ReferenceAttention", "core-FusedAttention", "decode_core")),
    ("attention projections", ("q_proj", "k_proj", "v_proj", "o_proj")),
    ("feed-forward", ("ffn-",)),
    ("norms", ("norm-LayerNorm", "norm-RMSNorm", "_norm-", "final_norm")),
    ("dropout", ("drop-FusedDropout", "drop-Dropout", "dropout-")),
    ("embeddings", ("embed", "Embedding")),
)


def _module(name: str) -> str:
    for label, keys in MODULES:
        if any(k in name for k in keys):
            return label
    if "/model-" in name or "/bert-" in name:
        return "output head / pooler"
    return "loss and other"


def profile(steps: int, out_dir: str):
    """MindSpore's profiler (CPU activity) over ``steps`` runs of the case set up last; returns per-op totals
    (milliseconds per run) by op type, by component (forward / backward / AdamW / plumbing) and by module."""
    import csv
    import glob
    from mindspore.profiler import ProfilerActivity, schedule, tensorboard_trace_handler
    from mindspore.profiler import profile as ms_profile
    os.makedirs(out_dir, exist_ok=True)
    with ms_profile(activities=[ProfilerActivity.CPU], on_trace_ready=tensorboard_trace_handler(out_dir),
                    schedule=schedule(wait=0, warmup=0, active=steps, repeat=1, skip_first=0)) as prof:
        for _ in range(steps):
            STATE["run"]()
            prof.step()
    files = sorted(glob.glob(os.path.join(out_dir, "*", "FRAMEWORK", "cpu_op_detail_info_0.csv")),
                   key=os.path.getmtime)
    if not files:
        raise RuntimeError(f"the MindSpore profiler wrote no cpu_op_detail_info_0.csv under {out_dir}")
    by_type, by_comp, by_module, top = {}, {}, {}, []
    with open(files[-1]) as fh:
        for row in csv.DictReader(fh):
            ms_per_run = float(row["op_total_time(ms)"]) / steps
            name, kind = row["full_op_name"], row["op_type"]
            by_type[kind] = by_type.get(kind, 0.0) + ms_per_run
            comp = next(label for label, pred in COMPONENTS if pred(name))
            by_comp[comp] = by_comp.get(comp, 0.0) + ms_per_run
            if comp in ("forward", "backward"):
                mod = f"{comp}: {_module(name)}"
                by_module[mod] = by_module.get(mod, 0.0) + ms_per_run
            top.append((ms_per_run, name))
    top.sort(reverse=True)
    total = sum(by_type.values())
    return {"op_total_ms": total, "matmul_ms": sum(v for k, v in by_type.items() if k in MATMUL_OPS),
            "by_type": dict(sorted(by_type.items(), key=lambda kv: -kv[1])),
            "by_component": dict(sorted(by_comp.items(), key=lambda kv: -kv[1])),
            "by_module": dict(sorted(by_module.items(), key=lambda kv: -kv[1])),
            "top_ops": [{"ms": t, "op": n} for t, n in top[:25]], "trace_dir": os.path.dirname(
                os.path.dirname(files[-1]))}


def setup_generate(model: dict, batch: int, prompt: int, new_tokens: int, warmup: int,
                   attention_impl: str = "auto"):
    from ms_llm.generation import generate
    from ms_llm.models.gpt import GPTLMHeadModel
    cfg = _model_cfg("gpt", model, attention_impl)
    net = GPTLMHeadModel(cfg)
    net.set_train(False)
    ids = np.random.default_rng(1).integers(3, cfg.vocab_size, (batch, prompt)).astype(np.int64)

    def run():
        out = generate(net, ids, max_new_tokens=new_tokens, eos_token_id=None)
        if out.shape != (batch, prompt + new_tokens):
            raise RuntimeError(f"generate returned {out.shape}, expected {(batch, prompt + new_tokens)}")
        return out
    first = time_calls(run, 1)[0]
    time_calls(run, max(0, warmup - 1))
    STATE["run"] = run
    return {"first_call_s": first, "tokens_per_call": batch * new_tokens}


def setup_matmul(size: int, lib: str):
    a = np.random.default_rng(0).standard_normal((size, size)).astype(np.float32)
    if lib == "numpy":
        def run():
            return a @ a
    else:
        from mindspore import Tensor, ops
        t = Tensor(a)

        def run():
            return ops.matmul(t, t).asnumpy()
    time_calls(run, 2)
    STATE["run"] = run
    return {"flops_per_call": 2.0 * size ** 3}


def setup_compile(model: dict, layers: int, batch: int, seq: int):
    cfg = _model_cfg("gpt", dict(model, num_layers=layers), "reference")
    run, _, n_params = _train_step("gpt", cfg, batch, seq)
    first = time_calls(run, 1)[0]
    STATE["run"] = run
    try:
        from ms_llm.layers.block import shares_graph
    except ImportError:                       # an ms_llm tree (--ms-llm-root) from before layer-graph sharing
        return {"first_step_s": first, "params": n_params, "shared_layer_graph": False}
    shared = [shares_graph(c) for _, c in STATE["loss_net"].cells_and_names() if type(c).__name__ == "TransformerBlock"]
    return {"first_step_s": first, "params": n_params, "shared_layer_graph": bool(shared) and all(shared)}


def run(n: int):
    return {"times": time_calls(STATE["run"], n)}


def versions():
    import mindspore as ms
    import ms_llm
    return {"mindspore": ms.__version__, "numpy": np.__version__, "python": sys.version.split()[0],
            "ms_llm": os.path.dirname(ms_llm.__file__)}


if __name__ == "__main__":
    _init(int(sys.argv[sys.argv.index("--threads") + 1]))
    serve({"setup_train": setup_train, "setup_generate": setup_generate, "setup_matmul": setup_matmul,
           "setup_compile": setup_compile, "run": run, "breakdown": breakdown, "profile": profile, "versions": versions})
