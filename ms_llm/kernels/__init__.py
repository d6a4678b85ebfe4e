"""Fused kernels and their reference implementations (same signature); see :mod:`ms_llm.kernels.attention` and
:mod:`ms_llm.kernels.moe_routing`; the decode-time output-head GEMV in :mod:`ms_llm.kernels.gemv`."""

from .attention import ATTENTION_IMPLS, FusedAttention, ReferenceAttention, make_attention
from .gemv import Gemv, MatMulNT
from .moe_routing import (MOE_ROUTING_FIELDS, MOE_ROUTING_IMPLS, FusedMoERouting, ReferenceMoERouting,
                          make_moe_routing)

__all__ = ["ATTENTION_IMPLS", "FusedAttention", "ReferenceAttention", "make_attention", "MOE_ROUTING_FIELDS",
           "MOE_ROUTING_IMPLS", "FusedMoERouting", "ReferenceMoERouting", "make_moe_routing", "Gemv", "MatMulNT"]
