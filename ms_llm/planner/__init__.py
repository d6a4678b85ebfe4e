"""Distributed-training planner: parameter counts, FLOPs, memory, communication and time of parallel layouts.

Pure Python (no MindSpore graphs). Entry point for the CLI: :func:`run_plan` + :func:`format_report`::

    report = run_plan(model_cfg, seq_length=2048, global_batch=1536, devices=1024, device_type="A100")
    print(format_report(report)); json.dumps(report.to_dict())
"""
from .costs import (LayerSpec, ParamCounts, StepFlops, forward_flops_per_token, layer_specs, megatron_gpt_flops,
                    param_counts, step_flops)
from .devices import DeviceSpec, get_device, known_devices, load_devices
from .layout import Layout, structural_problems
from .memory import MemoryBreakdown, memory_breakdown
from .comm import CommItem, comm_per_stage, comm_summary
from .timing import Factors, LayoutPlan, evaluate
from .search import SearchResult, search_layouts
from .report import PlanReport, format_report, plan_for_run, run_plan
from .shape import ModelShape, as_shape

__all__ = [
    "ModelShape", "as_shape", "LayerSpec", "ParamCounts", "StepFlops", "param_counts", "forward_flops_per_token",
    "layer_specs", "step_flops", "megatron_gpt_flops", "DeviceSpec", "get_device", "known_devices",
    "load_devices", "Layout", "structural_problems", "MemoryBreakdown", "memory_breakdown", "CommItem",
    "comm_per_stage", "comm_summary", "Factors", "LayoutPlan", "evaluate", "SearchResult", "search_layouts",
    "PlanReport", "run_plan", "plan_for_run", "format_report",
]
