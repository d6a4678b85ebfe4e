"""MoE layer vs a dense FFN with the same activated FLOPs, and index dispatch vs the one-hot einsum dispatch.

For each (experts E, top-k) the MoE layer (router + dispatch + E experts of width F + combine) runs on the same
tokens as a dense FFN of width k * F: with capacity factor 1.0 the experts hold exactly tokens * k slots, so both
do the same matmul FLOPs (2 * 2 * H * F * k per token). Columns besides the layer as configured by default:

- "reference dispatch": MindSpore ops for dispatch/combine instead of the fused kernels ``moe.dispatch_impl: auto``
  takes on CPU (:mod:`ms_llm.kernels.moe_dispatch`);
- "reference routing": the composite routing ops (``moe.router_impl='reference'``) instead of the fused routing
  kernel ``moe.router_impl: auto`` takes on CPU (:mod:`ms_llm.kernels.moe_routing`);
- "one-hot einsum": GShard/Mesh-TensorFlow's one-hot einsum dispatch/combine (O(G*T*E*C*H) instead of O(G*E*C*H)).

Times are medians over repeats of forward + backward (gradients of the input and of every weight for a fixed random
output cotangent, as inside a network), GRAPH_MODE, float32, CPU. The variants run back to back in every repeat, in
an order rotated from one repeat to the next (what ran just before a variant changes its cache state: the experts'
batched products run on their own took 0.98x or 1.44x of the dense FFN's time by their place in the order), and the
reported ratio is the median of the per-repeat ratios, so slow drifts of the machine's load (it is shared) cancel
out. ``bench/profile_moe.py`` splits one case's time by op type.

    python bench/bench_moe.py [--quick]      # prints a markdown table, writes bench/results/moe.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mindspore as ms                                                        # noqa: E402
from mindspore import Tensor, nn, ops                                          # noqa: E402

from ms_llm.config import ModelConfig, MoEConfig                              # noqa: E402
from ms_llm.layers.mlp import FeedForward                                     # noqa: E402
from ms_llm.moe import MoELayer                                               # noqa: E402
from ms_llm.moe.dispatcher import Dispatcher                                  # noqa: E402


class EinsumDispatcher(Dispatcher):
    """Dispatch and combine as one-hot batched matmuls (GShard's einsums), same contract as Dispatcher."""

    def __init__(self):
        super().__init__()
        self.bmm = ops.BatchMatMul()
        self.bmm_t = ops.BatchMatMul(transpose_a=True)

    def dispatch(self, x, slot_token):
        g, e, c = slot_token.shape
        mask = ops.reshape(ops.one_hot(slot_token, x.shape[1], 1.0, 0.0), (g, e * c, x.shape[1]))   # (G, E*C, T)
        slots = ops.reshape(self.bmm(mask, x), (g, e, c, x.shape[-1]))                          # (G, E, C, H)
        return ops.reshape(ops.transpose(slots, (1, 0, 2, 3)), (e, g * c, x.shape[-1]))        # (E, G*C, H)

    def combine(self, y, slot_token, slot_weight, tokens: int):
        g, e, c = slot_token.shape
        h = y.shape[-1]
        y = ops.reshape(ops.transpose(ops.reshape(y, (e, g, c, h)), (1, 0, 2, 3)), (g, e * c, h))  # (G, E*C, H)
        mask = ops.one_hot(slot_token, tokens, 1.0, 0.0) * ops.expand_dims(slot_weight, -1)       # (G, E, C, T)
        return self.bmm_t(ops.reshape(mask, (g, e * c, tokens)), y)                               # (G, T, H)


class Backward(nn.Cell):
    """Forward + backward of a layer for a fixed random output cotangent (as inside a network: a constant all-ones
    cotangent, the gradient of ``y.sum()``, reaches MindSpore's CPU BatchMatMul backward as a broadcast tensor and
    took it ~1.4x longer than a real one). Returns the gradients of the input and of every weight; an MoE layer's
    auxiliary loss gets cotangent 1."""

    def __init__(self, layer, moe: bool, dy):
        super().__init__()
        self.layer = layer
        self.moe = moe
        self.dy = dy
        self.one = Tensor(1.0, ms.float32)
        self.weights = ms.ParameterTuple(layer.trainable_params())
        self.grad = ops.GradOperation(get_all=True, get_by_list=True, sens_param=True)

    def construct(self, x):
        if self.moe:
            return self.grad(self.layer, self.weights)(x, (self.dy, self.one))
        return self.grad(self.layer, self.weights)(x, self.dy)


def run_once(fn, x) -> float:
    t0 = time.perf_counter()
    (dx,), dw = fn(x)
    dx.asnumpy()
    for g in dw:
        g.asnumpy()
    return time.perf_counter() - t0


def layer_config(hidden: int, ffn: int, experts: int, k: int) -> ModelConfig:
    """The benchmarked MoE layer: ReLU experts of width ``ffn``, no biases, capacity factor 1.0 (exactly tokens x k
    slots, so the experts do the FLOPs of a dense FFN of width k x ffn)."""
    return ModelConfig(arch="glam", hidden_size=hidden, num_heads=4, ffn_hidden_size=ffn, activation="relu",
                       use_bias=False, dropout=0.0, moe=MoEConfig(num_experts=experts, top_k=k,
                                                                  capacity_factor_train=1.0, capacity_factor_eval=1.0))


def bench_case(experts: int, k: int, args, batch: int) -> dict:
    h, f = args.hidden, args.ffn
    cfg = layer_config(h, f, experts, k)
    x = Tensor(np.random.default_rng(0).normal(size=(batch, args.seq, h)).astype(np.float32))
    dy = Tensor(np.random.default_rng(2).normal(size=x.shape).astype(np.float32))
    dense = Backward(FeedForward(h, k * f, "relu", has_bias=False), False, dy)
    moe = Backward(MoELayer(cfg), True, dy)
    einsum_layer = MoELayer(cfg)
    einsum_layer.dispatcher = EinsumDispatcher()
    einsum = Backward(einsum_layer, True, dy)
    ref_routing = Backward(MoELayer(dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe,
                                                                                     router_impl="reference"))),
                           True, dy)
    ref_dispatch = Backward(MoELayer(dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe,
                                                                                      dispatch_impl="reference"))),
                            True, dy)
    for net in (dense, moe, einsum, ref_routing, ref_dispatch):
        net.set_train(True)
    # same routing, same outputs: the dispatchers and the routing implementations are interchangeable
    for other in (einsum, ref_routing, ref_dispatch):
        for src, dst in zip(moe.trainable_params(), other.trainable_params()):
            dst.set_data(src.data)
    y1, y2, y3, y4 = (net.layer(x)[0].asnumpy() for net in (moe, einsum, ref_routing, ref_dispatch))
    assert np.allclose(y1, y2, rtol=1e-4, atol=1e-5), "einsum and index dispatch disagree"
    assert np.allclose(y1, y3, rtol=1e-4, atol=1e-5), "fused and composite routing disagree"
    assert np.allclose(y1, y4, rtol=1e-4, atol=1e-5), "fused and reference dispatch disagree"
    runs = {"dense": dense, "moe": moe, "einsum": einsum, "ref_routing": ref_routing, "ref_dispatch": ref_dispatch}
    for fn in runs.values():                                                  # compile and warm up
        run_once(fn, x)
        run_once(fn, x)
    samples = {name: [] for name in runs}
    names = list(runs)
    for i in range(args.repeats):                                             # back to back: same machine load;
        for name in names[i % len(names):] + names[:i % len(names)]:          # rotated, so that what ran before a
            samples[name].append(run_once(runs[name], x))                     # variant (its cache state) varies
    t = {name: statistics.median(v) for name, v in samples.items()}

    def ratio(name):
        return statistics.median(a / b for a, b in zip(samples[name], samples["dense"]))

    tokens = batch * args.seq
    return {"experts": experts, "top_k": k, "tokens": tokens, "hidden": h, "expert_ffn": f, "dense_ffn": k * f,
            "capacity_per_sequence": -(-args.seq * k // experts), "tokens_per_expert": tokens * k // experts,
            "dense_ms": 1e3 * t["dense"], "moe_ms": 1e3 * t["moe"], "moe_einsum_ms": 1e3 * t["einsum"],
            "moe_ref_routing_ms": 1e3 * t["ref_routing"], "moe_ref_dispatch_ms": 1e3 * t["ref_dispatch"],
            "ratio": ratio("moe"), "ratio_einsum": ratio("einsum"), "ratio_ref_routing": ratio("ref_routing"),
            "ratio_ref_dispatch": ratio("ref_dispatch"), "repeats": args.repeats}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="MindSpore CPU kernel threads")
    p.add_argument("--quick", action="store_true", help="small shapes, one round (smoke run)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "moe.json"))
    args = p.parse_args()
    if args.quick:
        args.batch, args.seq, args.hidden, args.ffn, args.repeats = 2, 64, 64, 128, 3
    ms.set_device("CPU")
    ms.device_context.cpu.op_tuning.threads_num(args.threads)       # MindSpore's default is 25
    ms.set_context(mode=ms.GRAPH_MODE)
    # the four (experts, top-k) cases, then 64 experts / top-1 again with 4x the tokens: the ratio depends on how
    # many tokens share each expert's weights (the weight-gradient GEMMs of 64 experts are small and memory-bound)
    cases = [(8, 1, args.batch), (8, 2, args.batch), (64, 1, args.batch), (64, 2, args.batch),
             (64, 1, 4 * args.batch)]
    rows = [bench_case(e, k, args, b) for e, k, b in cases]
    print(f"MoE layer vs dense FFN of equal activated FLOPs, forward + backward, sequences of {args.seq} tokens, "
          f"H={args.hidden}, expert F={args.ffn}, capacity factor 1.0, float32, CPU, median of {args.repeats} "
          f"paired repeats")
    print()
    print("| experts | top-k | tokens | tokens/expert | dense FFN width | dense ms | MoE ms | MoE / dense | reference "
          "dispatch / dense | reference routing / dense | one-hot einsum dispatch / dense |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['experts']} | {r['top_k']} | {r['tokens']} | {r['tokens_per_expert']} | {r['dense_ffn']} | "
              f"{r['dense_ms']:.0f} | {r['moe_ms']:.0f} | {r['ratio']:.2f}x | {r['ratio_ref_dispatch']:.2f}x | "
              f"{r['ratio_ref_routing']:.2f}x | {r['ratio_einsum']:.2f}x |")
    result = {"benchmark": "moe_vs_dense_ffn", "mode": "forward+backward", "dtype": "float32",
              "mindspore": ms.__version__, "machine": f"{platform.machine()} {os.cpu_count()} cores",
              "load_average_1min": os.getloadavg()[0], "quick": args.quick, "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(result, fh, indent=2)
    os.replace(tmp, args.out)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
