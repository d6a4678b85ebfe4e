"""Per-device memory of a layout: weights, gradients, optimizer states, activations.

Model states (bytes per parameter), mixed precision as in ZeRO (Rajbhandari et al. 2020, section 3.1):
fp16/bf16 weights 2, gradients 2, fp32 master weights + Adam m + v 12 (16 in total); plain fp32: 4 + 4 + 8.
Optimizer sharding (ZeRO-1 / MindSpore optimizer parallel) divides the optimizer states by the data-parallel
replicas of each parameter.

Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
section 4, 16-bit activations) per layer and micro-batch of b sequences:
* no parallelism: ``s b h (34 + 5 a s / h)`` for a GPT layer (f = 4h), generalised in costs.layer_specs;
* tensor parallel t, no sequence parallel: ``s b h (10 + 24/t + 5 a s/(h t))`` (LayerNorm inputs, block inputs
  and dropout masks stay whole on every rank);
* with sequence parallel: everything divided by t;
* selective recompute drops the ``5 a s / h`` attention-score term;
* full recompute stores the layer input ``2 s b h`` (/t with sequence parallel) and re-materialises one layer at
  a time during backward (counted once per stage as the recompute working set).
Pipeline 1F1B (PipeDream-Flush): stage i keeps ``min(p - i, m)`` micro-batches in flight, so stage 0 holds p.
The last stage also holds the fp32 logits of one micro-batch, ``4 s b V / t`` bytes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import List

from .costs import LayerSpec, embedding_params, head_params, layer_specs
from .devices import DeviceSpec
from .layout import Layout
from .shape import ModelShape

# bytes per parameter: (weights, gradients, optimizer states)
STATE_BYTES = {"fp16": (2, 2, 12), "bf16": (2, 2, 12), "fp32": (4, 4, 8)}
ACT_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}


@dataclass(frozen=True)
class StageParams:
    """Parameters held by one device of a pipeline stage."""
    dense: float              # replicated over data parallel (split by tp where the layer allows)
    expert: float             # expert shards (replicated over layout.expert_replicas)

    @property
    def total(self) -> float:
        return self.dense + self.expert


@dataclass(frozen=True)
class MemoryBreakdown:
    stage: int                # pipeline stage with the largest total (reported)
    params: float             # parameters on one device of that stage
    weights: float            # bytes
    gradients: float
    optimizer: float
    activations: float        # stored activations of the in-flight micro-batches
    recompute_working: float  # one layer re-materialised during backward (full / selective recompute)
    logits: float             # fp32 logits (last stage)
    inflight_micro_batches: int
    total: float
    capacity: float           # usable device memory (HBM minus the reserve)
    fits: bool

    def to_dict(self) -> dict:
        return asdict(self)


def stage_slices(shape: ModelShape, pp: int) -> List[List[LayerSpec]]:
    specs = layer_specs(shape)
    if len(specs) % pp:
        raise ValueError(f"pp={pp} does not divide the {len(specs)} layers")
    n = len(specs) // pp
    return [specs[i * n:(i + 1) * n] for i in range(pp)]


def stage_params(shape: ModelShape, layout: Layout, stage: int, layers: List[LayerSpec]) -> StageParams:
    t, p = layout.tp, layout.pp
    dense = sum(s.params_tp for s in layers) / t + sum(s.params_rep for s in layers)
    expert = sum(s.params_expert for s in layers) / layout.expert_shards
    emb, head = embedding_params(shape), head_params(shape)
    if stage == 0:
        dense += emb["word"] / t + emb["replicated"]
    if stage == p - 1:
        dense += head["tp"] / t + head["replicated"]
        if shape.tie_word_embeddings and p > 1:
            dense += emb["word"] / t          # Megatron keeps a copy of the tied embedding on the last stage
    return StageParams(dense=dense, expert=expert)


def layer_activation_bytes(shape: ModelShape, spec: LayerSpec, layout: Layout, recompute: str) -> float:
    """Stored activation bytes of one layer for one micro-batch (Korthikanti et al. 2022)."""
    s, b, h, a, t = shape.seq_length, layout.micro_batch_size, shape.hidden_size, shape.num_heads, layout.tp
    scale = ACT_BYTES[layout.dtype] / 2.0      # the coefficients assume 16-bit activations
    sbh = s * b * h
    if recompute == "full":
        return scale * 2.0 * sbh / (t if layout.sequence_parallel else 1)
    sq = 0.0 if recompute == "selective" else spec.act_sq * a * s * s * b / t
    if layout.sequence_parallel:
        lin = sbh * spec.act_lin / t
    else:
        lin = sbh * (spec.act_lin_nonsplit + (spec.act_lin - spec.act_lin_nonsplit) / t)
    return scale * (lin + sq)


def memory_per_stage(shape: ModelShape, layout: Layout, device: DeviceSpec,
                     memory_reserve: float = 0.08) -> List[MemoryBreakdown]:
    """Per-device memory of every pipeline stage."""
    if not 0 <= memory_reserve < 1:
        raise ValueError(f"memory_reserve: must be in [0, 1), got {memory_reserve}")
    w_b, g_b, o_b = STATE_BYTES[layout.dtype]
    capacity = device.hbm_bytes * (1.0 - memory_reserve)
    out = []
    for i, layers in enumerate(stage_slices(shape, layout.pp)):
        sp = stage_params(shape, layout, i, layers)
        if layout.optimizer_sharding:
            opt_params = sp.dense / layout.dp + sp.expert / layout.expert_replicas
        else:
            opt_params = sp.total
        inflight = min(layout.pp - i, layout.num_micro_batches)
        per_mb = sum(layer_activation_bytes(shape, s, layout, layout.recompute) for s in layers)
        working = 0.0
        if layout.recompute == "full":
            working = max(layer_activation_bytes(shape, s, layout, "none") for s in layers)
        elif layout.recompute == "selective":
            working = max(layer_activation_bytes(shape, s, layout, "none") -
                          layer_activation_bytes(shape, s, layout, "selective") for s in layers)
        logits = 0.0
        if i == layout.pp - 1:
            logits = 4.0 * shape.seq_length * layout.micro_batch_size * shape.vocab_size / layout.tp
        weights, grads, opt = sp.total * w_b, sp.total * g_b, opt_params * o_b
        acts = inflight * per_mb
        total = weights + grads + opt + acts + working + logits
        out.append(MemoryBreakdown(stage=i, params=sp.total, weights=weights, gradients=grads, optimizer=opt,
                                   activations=acts, recompute_working=working, logits=logits,
                                   inflight_micro_batches=inflight, total=total, capacity=capacity,
                                   fits=total <= capacity))
    return out


def memory_breakdown(shape: ModelShape, layout: Layout, device: DeviceSpec,
                     memory_reserve: float = 0.08) -> MemoryBreakdown:
    """The pipeline stage with the largest per-device memory (the one that must fit)."""
    return max(memory_per_stage(shape, layout, device, memory_reserve), key=lambda m: m.total)
