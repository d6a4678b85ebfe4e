"""A parallel layout (dp x tp x pp devices, ep carved out of dp x tp) and its structural checks."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import List

from .costs import RECOMPUTE
from .devices import DTYPES, DeviceSpec
from .shape import ModelShape


@dataclass(frozen=True)
class Layout:
    """One way to run a step on ``dp * tp * pp`` devices.

    Expert parallel does not add devices: as in MindSpore's MoE parallel config and Megatron-core, the ``ep``
    expert shards live inside the ``dp * tp`` devices of a pipeline stage (``ep`` divides ``dp``, or ``ep`` is a
    multiple of ``dp`` that divides ``dp * tp``).
    """
    dp: int                               # data-parallel replicas
    tp: int = 1                           # tensor (model) parallel degree, MindSpore's model_parallel
    pp: int = 1                           # pipeline stages
    ep: int = 1                           # expert-parallel degree (MoE only)
    micro_batch_size: int = 1             # sequences per micro-batch (b)
    num_micro_batches: int = 1            # micro-batches per step per pipeline (m; gradient accumulation if pp=1)
    optimizer_sharding: bool = False      # ZeRO-1 / MindSpore optimizer parallel: optimizer states split over dp
    recompute: str = "none"               # none | selective (attention core) | full (every layer)
    dtype: str = "bf16"                   # compute dtype: fp16 / bf16 mixed precision (fp32 master), or fp32
    sequence_parallel: bool = False       # Korthikanti et al. sequence parallelism inside tp groups

    def __post_init__(self):
        for name in ("dp", "tp", "pp", "ep", "micro_batch_size", "num_micro_batches"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"layout.{name}: must be an integer >= 1, got {v!r}")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"layout.recompute: '{self.recompute}' is not one of {list(RECOMPUTE)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"layout.dtype: '{self.dtype}' is not one of {list(DTYPES)}")

    @property
    def devices(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def global_batch(self) -> int:
        return self.dp * self.micro_batch_size * self.num_micro_batches

    @property
    def expert_shards(self) -> int:
        """Devices of a stage that split one copy of the experts (expert axis x tensor axis)."""
        if self.ep <= self.dp:
            return self.ep * self.tp
        return self.dp * self.tp

    @property
    def expert_replicas(self) -> int:
        """Copies of each expert shard inside a stage (the expert-gradient all-reduce group size)."""
        return self.dp * self.tp // self.expert_shards

    def label(self) -> str:
        parts = [f"dp{self.dp}", f"tp{self.tp}", f"pp{self.pp}"]
        if self.ep > 1:
            parts.append(f"ep{self.ep}")
        parts.append(f"mbs{self.micro_batch_size}x{self.num_micro_batches}")
        parts.append(f"rc:{self.recompute}")
        if self.optimizer_sharding:
            parts.append("zero1")
        if self.sequence_parallel:
            parts.append("sp")
        return " ".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)


def structural_problems(shape: ModelShape, layout: Layout, device: DeviceSpec) -> List[str]:
    """Reasons ``layout`` cannot run ``shape`` on ``device`` (memory aside); empty when it can."""
    problems = []
    t = layout.tp
    if shape.num_heads % t:
        problems.append(f"tp={t} does not divide num_heads={shape.num_heads}")
    if shape.kv_heads % t:
        problems.append(f"tp={t} does not divide num_kv_heads={shape.kv_heads}")
    if shape.ffn_hidden_size % t or (shape.num_experts and shape.expert_ffn % t):
        problems.append(f"tp={t} does not divide the FFN width")
    if t > device.devices_per_node:
        problems.append(f"tp={t} exceeds devices_per_node={device.devices_per_node} of {device.name}")
    if shape.total_layers % layout.pp:
        problems.append(f"pp={layout.pp} does not divide the {shape.total_layers} layers")
    if layout.pp > 1 and layout.num_micro_batches < layout.pp:
        problems.append(f"num_micro_batches={layout.num_micro_batches} < pp={layout.pp} leaves stages idle")
    e = layout.ep
    if not shape.num_experts:
        if e != 1:
            problems.append(f"ep={e} on a dense model (num_experts=0)")
    else:
        if shape.num_experts % e:
            problems.append(f"ep={e} does not divide num_experts={shape.num_experts}")
        if not (layout.dp % e == 0 or (e % layout.dp == 0 and t % (e // layout.dp) == 0)):
            problems.append(f"ep={e} must divide dp={layout.dp} or be dp times a divisor of tp={t}")
    if device.peak_tflops.get(layout.dtype) is None:
        problems.append(f"{device.name} has no {layout.dtype} peak rate")
    return problems
