"""Fused kernels and their reference implementations (same signature); see :mod:`ms_llm.kernels.attention` and
:mod:`ms_llm.kernels.moe_routing`; the decode-time output-head GEMV in :mod:`ms_llm.kernels.gemv` and the fused
decode layer in :mod:`ms_llm.kernels.decode_layer`."""

from .attention import ATTENTION_IMPLS, FusedAttention, ReferenceAttention, make_attention
from .decode_layer import DecodeLayerReference, FusedDecodeLayer, make_decode_layer
from .gemv import Gemv, MatMulNT
from .moe_routing import (MOE_ROUTING_FIELDS, MOE_ROUTING_IMPLS, FusedMoERouting, ReferenceMoERouting,
                          make_moe_routing)

__all__ = ["ATTENTION_IMPLS", "FusedAttention", "ReferenceAttention", "make_attention", "MOE_ROUTING_FIELDS",
           "MOE_ROUTING_IMPLS", "FusedMoERouting", "ReferenceMoERouting", "make_moe_routing", "Gemv", "MatMulNT",
           "DecodeLayerReference", "FusedDecodeLayer", "make_decode_layer"]
