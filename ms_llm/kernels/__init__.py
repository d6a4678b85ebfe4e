"""Fused kernels and their reference implementations (same signature): attention (:mod:`~ms_llm.kernels.attention`),
MoE routing (:mod:`~ms_llm.kernels.moe_routing`), MoE dispatch and combine (:mod:`~ms_llm.kernels.moe_dispatch`),
the decode-time output-head GEMV (:mod:`~ms_llm.kernels.gemv`), the fused decode layer
(:mod:`~ms_llm.kernels.decode_layer`), LayerNorm (:mod:`~ms_llm.kernels.layer_norm`), GELU
(:mod:`~ms_llm.kernels.gelu`), dropout (:mod:`~ms_llm.kernels.dropout`), the OpenBLAS linear product
(:mod:`~ms_llm.kernels.blas_linear`), AdamW (:mod:`~ms_llm.kernels.adamw`) and the clip norm's sum of squares
(:mod:`~ms_llm.kernels.sum_squares`).

The names below are imported from their module on first access (PEP 562), so importing the package runs nothing and
``ms_llm.layers`` can use the kernels that some kernels' references build from layers (no import cycle).
"""

import importlib

_EXPORTS = {
    "ATTENTION_IMPLS": "attention", "ATTENTION_LAYOUTS": "attention", "FusedAttention": "attention",
    "ReferenceAttention": "attention", "make_attention": "attention",
    "MOE_ROUTING_FIELDS": "moe_routing", "MOE_ROUTING_IMPLS": "moe_routing", "FusedMoERouting": "moe_routing",
    "ReferenceMoERouting": "moe_routing", "make_moe_routing": "moe_routing",
    "FusedMoEDispatch": "moe_dispatch", "ReferenceMoEDispatch": "moe_dispatch", "make_moe_dispatch": "moe_dispatch",
    "Gemv": "gemv", "MatMulNT": "gemv",
    "DecodeLayerReference": "decode_layer", "FusedDecodeLayer": "decode_layer", "make_decode_layer": "decode_layer",
    "FusedLayerNorm": "layer_norm", "ReferenceLayerNorm": "layer_norm", "make_layer_norm": "layer_norm",
    "FusedGelu": "gelu", "ReferenceGelu": "gelu", "make_gelu": "gelu",
    "FusedDropout": "dropout", "ReferenceDropout": "dropout", "make_dropout": "dropout",
    "BlasLinearProduct": "blas_linear", "ReferenceLinearProduct": "blas_linear", "make_linear_product": "blas_linear",
    "FusedAdamWUpdate": "adamw", "AdamWUpdateReference": "adamw", "make_adamw_update": "adamw",
    "FusedSumSquares": "sum_squares", "ReferenceSumSquares": "sum_squares", "make_sum_squares": "sum_squares",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
