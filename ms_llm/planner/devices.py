"""Device figures (devices.yaml): peak rates, memory, links and the one calibration constant per device.

Every figure in the YAML is ``{value: ..., source: "..."}``; a missing source is a load error. Bandwidths are
GB/s (1e9 bytes/s) per device per direction, TFLOPS are dense (no structured sparsity).
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

DEFAULT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "devices.yaml")
DTYPES = ("fp16", "bf16", "fp32")

# figure name -> (required, must be positive when present)
_FIGURES = {
    "peak_fp16_tflops": False,
    "peak_bf16_tflops": False,
    "peak_fp32_tflops": False,
    "hbm_gib": True,
    "hbm_bandwidth_gbs": True,
    "devices_per_node": True,
    "intra_node_group": False,
    "intra_node_bandwidth_gbs": True,
    "cross_group_bandwidth_gbs": False,
    "inter_node_bandwidth_gbs": True,
    "matmul_efficiency": True,
}


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    description: str
    calibrated: bool                       # matmul_efficiency comes from a published measurement on this device
    peak_tflops: Dict[str, Optional[float]]  # dtype -> dense peak TFLOPS (None = not supported / not published)
    hbm_gib: float                         # device memory, GiB
    hbm_bandwidth_gbs: float               # device memory bandwidth, GB/s
    devices_per_node: int                  # devices in one server
    intra_node_group: int                  # devices joined by the full-speed intra-node link (<= devices_per_node)
    intra_node_bandwidth_gbs: float        # per device, per direction, inside a group
    cross_group_bandwidth_gbs: float       # per device, per direction, between groups of one node
    inter_node_bandwidth_gbs: float        # per device, per direction, between nodes
    matmul_efficiency: float               # sustained fraction of peak on transformer-layer kernels
    sources: Dict[str, str] = field(default_factory=dict)
    aliases: Tuple[str, ...] = ()

    def peak_flops(self, dtype: str) -> float:
        """Peak FLOP/s for ``dtype`` (fp16, bf16, fp32); a clear error if the device has no such rate."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype: '{dtype}' is not one of {list(DTYPES)}")
        value = self.peak_tflops.get(dtype)
        if value is None:
            have = [d for d in DTYPES if self.peak_tflops.get(d)]
            raise ValueError(f"dtype: device '{self.name}' has no {dtype} peak rate "
                             f"({self.sources.get(f'peak_{dtype}_tflops', 'no source')}); use one of {have}")
        return value * 1e12

    def group_bandwidth(self, size: int, stride: int) -> Tuple[float, str]:
        """(bytes/s per device per direction, link name) of a communicator of ``size`` ranks ``stride`` apart.

        Ranks are laid out with tensor parallel fastest, then data (expert) parallel, then pipeline, as in
        Megatron-LM and MindSpore; a group whose ranks span ``size * stride`` consecutive devices stays on one
        node while that span fits ``devices_per_node``.
        """
        if size <= 1:
            return math.inf, "none"
        span = size * stride
        if span > self.devices_per_node:
            return self.inter_node_bandwidth_gbs * 1e9, "inter-node"
        if span > self.intra_node_group:
            return self.cross_group_bandwidth_gbs * 1e9, "intra-node (cross-group)"
        return self.intra_node_bandwidth_gbs * 1e9, "intra-node"

    @property
    def hbm_bytes(self) -> float:
        return self.hbm_gib * 2.0 ** 30


def _figure(entry: dict, device: str, key: str, required: bool, path: str):
    if key not in entry:
        if required:
            raise ValueError(f"{path}: device '{device}' lacks '{key}'")
        return None, None
    fig = entry[key]
    if not isinstance(fig, dict) or set(fig) != {"value", "source"}:
        raise ValueError(f"{path}: devices.{device}.{key} must be a mapping with exactly 'value' and 'source', "
                         f"got {fig!r}")
    source = fig["source"]
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"{path}: devices.{device}.{key}.source must be a non-empty string")
    value = fig["value"]
    if value is None:
        if required:
            raise ValueError(f"{path}: devices.{device}.{key}.value is required (got null)")
        return None, source
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{path}: devices.{device}.{key}.value must be a positive number, got {value!r}")
    return float(value), source


def _parse(name: str, entry: dict, path: str) -> DeviceSpec:
    allowed = set(_FIGURES) | {"description", "aliases", "calibrated"}
    unknown = set(entry) - allowed
    if unknown:
        raise ValueError(f"{path}: devices.{name} has unknown key(s) {sorted(unknown)}; allowed {sorted(allowed)}")
    values, sources = {}, {}
    for key, required in _FIGURES.items():
        values[key], src = _figure(entry, name, key, required, path)
        if src is not None:
            sources[key] = src
    if not any(values[f"peak_{d}_tflops"] for d in DTYPES):
        raise ValueError(f"{path}: devices.{name} has no peak rate for any of {list(DTYPES)}")
    eff = values["matmul_efficiency"]
    if not 0 < eff <= 1:
        raise ValueError(f"{path}: devices.{name}.matmul_efficiency must be in (0, 1], got {eff}")
    dpn = int(values["devices_per_node"])
    group = int(values["intra_node_group"] or dpn)
    if group > dpn or dpn % group:
        raise ValueError(f"{path}: devices.{name}.intra_node_group={group} must divide devices_per_node={dpn}")
    cross = values["cross_group_bandwidth_gbs"]
    if group < dpn and cross is None:
        raise ValueError(f"{path}: devices.{name} has intra_node_group < devices_per_node and needs "
                         f"cross_group_bandwidth_gbs")
    calibrated = entry.get("calibrated")
    if not isinstance(calibrated, bool):
        raise ValueError(f"{path}: devices.{name}.calibrated must be true or false")
    return DeviceSpec(
        name=name, description=str(entry.get("description", "")), calibrated=calibrated,
        peak_tflops={d: values[f"peak_{d}_tflops"] for d in DTYPES},
        hbm_gib=values["hbm_gib"], hbm_bandwidth_gbs=values["hbm_bandwidth_gbs"], devices_per_node=dpn,
        intra_node_group=group, intra_node_bandwidth_gbs=values["intra_node_bandwidth_gbs"],
        cross_group_bandwidth_gbs=cross if cross is not None else values["intra_node_bandwidth_gbs"],
        inter_node_bandwidth_gbs=values["inter_node_bandwidth_gbs"], matmul_efficiency=eff, sources=sources,
        aliases=tuple(str(a) for a in (entry.get("aliases") or ())))


def load_devices(path: str = DEFAULT_PATH) -> Tuple[Dict[str, DeviceSpec], Dict[str, str]]:
    """({name: DeviceSpec}, {alias (lower case): name}) from a devices YAML file (the packaged one is cached)."""
    if os.path.abspath(path) == DEFAULT_PATH:
        return _load_default()
    return _load(path)


@functools.lru_cache(maxsize=1)
def _load_default():
    return _load(DEFAULT_PATH)


def _load(path: str):
    import yaml

    with open(path, "r", encoding="utf-8") as fh:
        doc = yaml.safe_load(fh)
    if not isinstance(doc, dict) or not isinstance(doc.get("devices"), dict) or not doc["devices"]:
        raise ValueError(f"{path}: expected a top-level 'devices' mapping")
    specs, aliases = {}, {}
    for name, entry in doc["devices"].items():
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: devices.{name} must be a mapping")
        specs[name] = _parse(name, entry, path)
        for alias in [name] + list(entry.get("aliases", []) or []):
            key = str(alias).lower()
            if key in aliases and aliases[key] != name:
                raise ValueError(f"{path}: alias '{alias}' names both '{aliases[key]}' and '{name}'")
            aliases[key] = name
    return specs, aliases


def known_devices(path: str = DEFAULT_PATH) -> list:
    """Names of the devices in the YAML (aliases not included)."""
    return sorted(load_devices(path)[0])


def get_device(device_type, path: str = DEFAULT_PATH) -> DeviceSpec:
    """The DeviceSpec for a name or alias (case-insensitive); a DeviceSpec passes through."""
    if isinstance(device_type, DeviceSpec):
        return device_type
    specs, aliases = load_devices(path)
    name = aliases.get(str(device_type).lower())
    if name is None:
        listed = ", ".join(f"{n} (aliases: {', '.join(specs[n].aliases) or '-'})" for n in sorted(specs))
        raise ValueError(f"device_type: unknown device '{device_type}'. Known devices: {listed}")
    return specs[name]
