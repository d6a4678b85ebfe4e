"""Hugging Face peer of the benchmarks: a worker process (see harness.py) run with the peer interpreter.

    /work/refenv/bin/python bench/worker_hf.py --threads 2 --reply-fd FD     # started by run_all.py

Needs ``torch`` (CPU) and ``transformers`` (the ``bench`` extra of setup.py: torch==2.13.0, transformers==5.24.0).
The cases mirror worker_ms.py with the same shapes, dtype (float32) and thread count (``torch.set_num_threads``):
- ``train``: ``BertForSequenceClassification`` or ``GPT2LMHeadModel`` (the GPT-3 architecture without its banded
  layers: the ms_llm side runs dense attention too), forward with labels, backward,
  ``clip_grad_norm_(1.0)``, ``torch.optim.AdamW`` (weight decay 0.01 on matrices only, as ms_llm), dropout on.
  Attention-probability dropout is 0 on both sides (ms_llm's attention has none);
- ``generate``: ``model.generate`` greedy, ``min_new_tokens = max_new_tokens`` (no early stop), default KV cache;
- ``matmul``: ``torch.mm`` of two (n, n) float32 matrices.
"""
from __future__ import annotations

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np                                                            # noqa: E402

from harness import serve, time_calls                                         # noqa: E402

STATE = {}
NO_DECAY = ("bias", "LayerNorm", "ln_", "norm")


def _init(threads: int) -> None:
    import torch
    torch.set_num_threads(threads)
    torch.manual_seed(0)


def _model(arch: str, m: dict, train: bool):
    import transformers
    if arch == "bert":
        cfg = transformers.BertConfig(
            vocab_size=m["vocab_size"], hidden_size=m["hidden_size"], num_hidden_layers=m["num_layers"],
            num_attention_heads=m["num_heads"], intermediate_size=m["ffn_hidden_size"], hidden_act=m["activation"],
            max_position_embeddings=m["max_position_embeddings"], type_vocab_size=m["type_vocab_size"],
            layer_norm_eps=m["norm_eps"], hidden_dropout_prob=m["dropout"], attention_probs_dropout_prob=0.0,
            num_labels=m["num_labels"])
        model = transformers.BertForSequenceClassification(cfg)
    else:
        cfg = transformers.GPT2Config(
            vocab_size=m["vocab_size"], n_positions=m["max_position_embeddings"], n_embd=m["hidden_size"],
            n_layer=m["num_layers"], n_head=m["num_heads"], n_inner=m["ffn_hidden_size"],
            activation_function=m["activation"], resid_pdrop=m["dropout"], embd_pdrop=m["dropout"], attn_pdrop=0.0,
            layer_norm_epsilon=m["norm_eps"], tie_word_embeddings=True)
        model = transformers.GPT2LMHeadModel(cfg)
    model.train(train)
    return model


def setup_train(arch: str, model: dict, batch: int, seq: int, warmup: int, attention_impl: str = "auto"):
    import torch
    net = _model(arch, model, train=True)
    rng = np.random.default_rng(0)
    if arch == "bert":
        types = np.zeros((batch, seq), np.int64)
        types[:, seq // 2:] = 1
        inputs = dict(input_ids=torch.from_numpy(rng.integers(1, model["vocab_size"], (batch, seq))),
                      token_type_ids=torch.from_numpy(types), attention_mask=torch.ones(batch, seq, dtype=torch.long),
                      labels=torch.from_numpy(rng.integers(0, 2, (batch,))))
    else:
        ids = torch.from_numpy(rng.integers(0, model["vocab_size"], (batch, seq)))
        inputs = dict(input_ids=ids, labels=ids)                    # the model shifts the labels itself
    decay = [p for n, p in net.named_parameters() if p.ndim >= 2 and not any(k in n for k in NO_DECAY)]
    other = [p for n, p in net.named_parameters() if not (p.ndim >= 2 and not any(k in n for k in NO_DECAY))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": other, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.999), eps=1e-8)
    params = list(net.parameters())

    STATE.update(net=net, inputs=inputs, opt=opt, params=params)

    def run():
        loss = net(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.item()
        if not np.isfinite(value):
            raise FloatingPointError(f"non-finite training step (loss {value})")
        return value
    first = time_calls(run, 1)[0]
    time_calls(run, max(0, warmup - 1))
    STATE["run"] = run
    return {"first_step_s": first, "params": sum(p.numel() for p in params), "tokens_per_step": batch * seq,
            "attn_implementation": getattr(net.config, "_attn_implementation", None)}


def breakdown(n: int):
    """Median seconds of the parts of the training step set up last, timed inside ``n`` steps (after one warm-up
    step): ``forward`` (loss), ``backward``, ``update`` (clip_grad_norm_ + AdamW step + zero_grad)."""
    import time
    import torch
    net, inputs, opt, params = STATE["net"], STATE["inputs"], STATE["opt"], STATE["params"]
    out = {"forward": [], "backward": [], "update": []}
    for i in range(n + 1):
        t0 = time.perf_counter()
        loss = net(**inputs).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if i:
            out["forward"].append(t1 - t0)
            out["backward"].append(t2 - t1)
            out["update"].append(t3 - t2)
    parts = {k: statistics.median(v) for k, v in out.items()}
    parts["forward_backward"] = parts["forward"] + parts["backward"]
    return {"parts": parts}


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation")


def profile(steps: int, out_dir: str = ""):
    """torch.profiler (CPU) over ``steps`` runs of the case set up last: self time per aten op (ms per run)."""
    import torch
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            STATE["run"]()
    by_type = {}
    for e in prof.key_averages():
        if e.key.startswith("aten::") or e.key.startswith("Optimizer"):
            by_type[e.key] = by_type.get(e.key, 0.0) + e.self_cpu_time_total / 1e3 / steps
    total = sum(by_type.values())
    return {"op_total_ms": total, "matmul_ms": sum(v for k, v in by_type.items() if k in MATMUL_OPS),
            "by_type": dict(sorted(by_type.items(), key=lambda kv: -kv[1])[:40])}


def generate_fn(net, vocab_size: int, batch: int, prompt: int, new_tokens: int):
    """A call of HF ``generate``: greedy, exactly ``new_tokens`` new tokens after a seeded random prompt."""
    import torch
    ids = torch.from_numpy(np.random.default_rng(1).integers(3, vocab_size, (batch, prompt)))
    mask = torch.ones_like(ids)

    def run():
        with torch.inference_mode():
            out = net.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               do_sample=False, pad_token_id=0)
        if tuple(out.shape) != (batch, prompt + new_tokens):
            raise RuntimeError(f"generate returned {tuple(out.shape)}, expected {(batch, prompt + new_tokens)}")
        return out
    return run


def setup_generate(model: dict, batch: int, prompt: int, new_tokens: int, warmup: int,
                   attention_impl: str = "auto"):
    run = generate_fn(_model("gpt", model, train=False), model["vocab_size"], batch, prompt, new_tokens)
    first = time_calls(run, 1)[0]
    time_calls(run, max(0, warmup - 1))
    STATE["run"] = run
    return {"first_call_s": first, "tokens_per_call": batch * new_tokens}


def setup_matmul(size: int, lib: str = "torch"):
    import torch
    a = torch.randn(size, size, dtype=torch.float32)

    def run():
        return torch.mm(a, a)
    time_calls(run, 2)
    STATE["run"] = run
    return {"flops_per_call": 2.0 * size ** 3}


def run(n: int):
    return {"times": time_calls(STATE["run"], n)}


def versions():
    import torch
    import transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__,
            "python": sys.version.split()[0], "torch_threads": torch.get_num_threads()}


if __name__ == "__main__":
    _init(int(sys.argv[sys.argv.index("--threads") + 1]))
    serve({"setup_train": setup_train, "setup_generate": setup_generate, "setup_matmul": setup_matmul,
           "run": run, "breakdown": breakdown, "profile": profile, "versions": versions})
