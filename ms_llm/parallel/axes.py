"""Logical axes and the one table that maps them to mesh dimensions.

Layers name the logical axes of their weights and activations; nothing else in the package writes raw
strategy tuples. Mesh dimensions: ``dp`` (data), ``mp`` (model/tensor), ``ep`` (expert).
"""
from __future__ import annotations

from typing import Dict, Optional

# logical axis -> mesh dimension (None = replicated)
AXIS_RULES: Dict[str, Optional[str]] = {
    "batch": "dp",      # sequences / tokens of a batch
    "seq": None,        # sequence positions
    "embed": None,      # model width (d_model)
    "heads": "mp",      # attention heads (and q/k/v projection outputs)
    "kv": None,         # key/value positions inside attention
    "head_dim": None,   # per-head width
    "mlp": "mp",        # feed-forward inner width
    "vocab": "mp",      # vocabulary (embedding rows, output logits)
    "expert": "ep",     # experts of an MoE layer
    "capacity": None,   # token slots of an expert
    "classes": None,    # labels of fine-tuning heads
}

MESH_DIMS = ("dp", "mp", "ep")
