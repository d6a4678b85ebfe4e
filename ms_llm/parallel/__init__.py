"""Distributed training on MindSpore: context, logical-axis sharding, pipeline, recompute, expert-parallel exchange,
data-parallel gradient reduction, strategy files and checkpoint re-sharding (nothing is imported eagerly)."""
