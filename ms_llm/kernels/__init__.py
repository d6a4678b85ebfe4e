"""Fused kernels and their reference implementations (same signature); see :mod:`ms_llm.kernels.attention`."""

from .attention import ATTENTION_IMPLS, FusedAttention, ReferenceAttention, make_attention

__all__ = ["ATTENTION_IMPLS", "FusedAttention", "ReferenceAttention", "make_attention"]
