"""Shared layers composed by every model."""
