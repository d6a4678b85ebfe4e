"""The device rule of the fused kernel cells: their C++ kernel on CPU, their reference (MindSpore's own ops) on
Ascend, and on any other device an error naming the cell and what to use there; and what an ``auto`` setting
resolves to (fused on CPU, reference elsewhere)."""

from __future__ import annotations

import mindspore as ms

KERNEL_DEVICES = ("CPU", "Ascend")


def resolve_auto(impl: str, valid: tuple[str, ...] = (), what: str = "") -> str:
    """The ``auto`` choice of a kernel setting: 'fused' on CPU (our C++ kernels), 'reference' (MindSpore's ops) on
    every other device; any other name is returned as it is, or, given the ``valid`` names, a name not among them
    raises ValueError ("unknown <what> impl ...")."""
    if valid and impl != "auto" and impl not in valid:
        raise ValueError(f"unknown {what} impl {impl!r}; valid: auto, {', '.join(valid)}")
    if impl == "auto":
        return "fused" if ms.get_context("device_target") == "CPU" else "reference"
    return impl


def kernel_device(cell: str, instead: str) -> str:
    """``ms.get_context('device_target')`` if it is 'CPU' or 'Ascend'; otherwise ValueError naming ``cell`` and
    ``instead`` (the reference to build there, e.g. ``"make_gemv('matmul')"``)."""
    device = ms.get_context("device_target")
    if device not in KERNEL_DEVICES:
        raise ValueError(f"{cell} supports device_target 'CPU' or 'Ascend', got {device!r}; use {instead} there")
    return device
