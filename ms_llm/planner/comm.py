"""Communication volume per step per device, per parallel dimension, and its time on the device's links.

Collective costs (bytes each device sends; a ring or mesh moves the same amount):
* all-reduce of S bytes over n ranks: ``2 (n-1)/n * S`` (reduce-scatter + all-gather; also the volume of a
  sharded optimizer's gradient reduce-scatter + parameter all-gather);
* all-to-all of S bytes per rank over n ranks: ``(n-1)/n * S``;
* point-to-point send of S bytes: S.
Time = bytes / (per-device, per-direction bandwidth of the link the group uses; devices.group_bandwidth).

Per dimension (s = seq, b = micro-batch, h = hidden, a = activation bytes, m micro-batches per step):
* DP: gradients of the parameters a device holds, all-reduced once per step over their replicas (dense
  parameters over dp, expert shards over layout.expert_replicas). Not overlapped with compute (as in
  Megatron-LM 2021 and MindSpore pipeline training, where the reduction follows the last micro-batch).
* TP (Megatron, Shoeybi et al. 2019): one all-reduce of ``s b h a`` bytes per attention / FFN block in the
  forward pass and one in the backward pass (4 per GPT layer per micro-batch), plus the forward ones again under
  full recompute. Sequence parallel replaces each by a reduce-scatter + all-gather of the same volume.
* PP: each micro-batch sends its activations forward and their gradients backward, ``s b h a / t`` bytes each
  (Narayanan et al. 2021 scatter/gather: each tensor-parallel rank sends its 1/t slice).
* EP: dispatch and combine all-to-alls per MoE layer, each of the ``s b k c h a / t`` bytes of routed slots
  (k = top_k, c = capacity factor), twice in forward, twice in backward, again in the forward under full
  recompute. Tensor-parallel ranks each exchange a 1/t slice of the tokens (sequence-parallel MoE).
TP, PP and EP happen inside every micro-batch and are on the pipeline's critical path; DP happens once.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict

from .devices import DeviceSpec
from .layout import Layout
from .memory import ACT_BYTES, STATE_BYTES, stage_params, stage_slices
from .shape import ModelShape


@dataclass(frozen=True)
class CommItem:
    dim: str                  # dp | tp | pp | ep
    group_size: int
    link: str                 # intra-node | intra-node (cross-group) | inter-node | none
    bandwidth_gbs: float      # per device per direction on that link (0 when there is no communication)
    bytes_per_step: float     # bytes one device sends per step (worst stage)
    seconds_per_step: float
    per_micro_batch_seconds: float  # the part inside each micro-batch (0 for dp)

    def to_dict(self) -> dict:
        return asdict(self)


def allreduce_bytes(size: float, n: int) -> float:
    return 0.0 if n <= 1 else 2.0 * (n - 1) / n * size


def alltoall_bytes(size: float, n: int) -> float:
    return 0.0 if n <= 1 else (n - 1) / n * size


def _item(dim, n, bw_link, per_step_bytes, per_mb_bytes) -> CommItem:
    bw, link = bw_link
    if n <= 1 or per_step_bytes <= 0:
        return CommItem(dim, n, "none", 0.0, 0.0, 0.0, 0.0)
    return CommItem(dim, n, link, bw / 1e9, per_step_bytes, per_step_bytes / bw, per_mb_bytes / bw)


def comm_per_stage(shape: ModelShape, layout: Layout, device: DeviceSpec) -> list:
    """[{dp, tp, pp, ep: CommItem}] for every pipeline stage."""
    s, b, h, t = shape.seq_length, layout.micro_batch_size, shape.hidden_size, layout.tp
    m, p, d = layout.num_micro_batches, layout.pp, layout.dp
    act = ACT_BYTES[layout.dtype]
    grad_bytes = STATE_BYTES[layout.dtype][1]
    full = layout.recompute == "full"
    tp_bw = device.group_bandwidth(t, 1)
    dp_bw = device.group_bandwidth(d, t)
    pp_bw = device.group_bandwidth(p, t * d)
    ep_group = layout.ep
    ep_bw = device.group_bandwidth(ep_group, t if layout.ep <= d else t * d // layout.ep)
    exp_bw = device.group_bandwidth(layout.expert_replicas, t * layout.ep)

    out = []
    for i, layers in enumerate(stage_slices(shape, p)):
        # TP: per micro-batch
        passes = 3 if full else 2                      # forward, backward (+ recomputed forward)
        n_ar = passes * sum(sp.tp_allreduces for sp in layers)
        tp_mb = n_ar * allreduce_bytes(s * b * h * act, t)
        # EP: per micro-batch
        n_moe = sum(1 for sp in layers if sp.moe)
        slots = s * b * shape.top_k * shape.capacity_factor * h * act / t
        ep_mb = passes * 2 * n_moe * alltoall_bytes(slots, ep_group)
        # PP: per micro-batch, activations forward + gradients backward
        pp_mb = (2.0 * s * b * h * act / t) if p > 1 else 0.0
        # DP: once per step
        sp_ = stage_params(shape, layout, i, layers)
        dp_step = allreduce_bytes(sp_.dense * grad_bytes, d)
        exp_step = allreduce_bytes(sp_.expert * grad_bytes, layout.expert_replicas)
        dp_item = _item("dp", d, dp_bw, dp_step, 0.0)
        if exp_step > 0:                                # expert gradients over their own replica group
            dp_item = CommItem("dp", d, dp_item.link if dp_step > 0 else exp_bw[1],
                               (dp_bw if dp_step > 0 else exp_bw)[0] / 1e9, dp_step + exp_step,
                               dp_item.seconds_per_step + exp_step / exp_bw[0], 0.0)
        out.append({
            "dp": dp_item,
            "tp": _item("tp", t, tp_bw, m * tp_mb, tp_mb),
            "pp": _item("pp", p, pp_bw, m * pp_mb, pp_mb),
            "ep": _item("ep", ep_group, ep_bw, m * ep_mb, ep_mb),
        })
    return out


def comm_summary(per_stage: list) -> Dict[str, CommItem]:
    """Worst stage per dimension (by time)."""
    return {dim: max((st[dim] for st in per_stage), key=lambda c: c.seconds_per_step)
            for dim in ("dp", "tp", "pp", "ep")}
