"""The fused kernel cells' device rule (``ms_llm.kernels._device``): their kernel on CPU, their reference on Ascend,
and on any other device a ValueError naming the cell and the reference to build there, before anything is built."""

from __future__ import annotations

import pytest

from ms_llm.kernels import _device
from ms_llm.kernels.adamw import FusedAdamWUpdate
from ms_llm.kernels.blas_linear import BlasLinearProduct
from ms_llm.kernels.decode_layer import FusedDecodeLayer
from ms_llm.kernels.dropout import FusedDropout
from ms_llm.kernels.gelu import FusedGelu
from ms_llm.kernels.gemv import Gemv
from ms_llm.kernels.layer_norm import FusedLayerNorm
from ms_llm.kernels.moe_dispatch import FusedMoEDispatch
from ms_llm.kernels.sum_squares import FusedSumSquares

CELLS = [
    (Gemv, (), "Gemv", "make_gemv('matmul')"),
    (FusedAdamWUpdate, (), "FusedAdamWUpdate", "make_adamw_update('reference')"),
    (BlasLinearProduct, (), "BlasLinearProduct", "make_linear_product('reference')"),
    (FusedGelu, ("gelu",), "FusedGelu", "make_gelu('reference', kind)"),
    (FusedLayerNorm, (1e-5,), "FusedLayerNorm", "make_layer_norm('reference', eps)"),
    (FusedSumSquares, (), "FusedSumSquares", "make_sum_squares('reference')"),
    (FusedDecodeLayer, (2, 1e-5, 0.5, "gelu"), "FusedDecodeLayer", "make_decode_layer('composite', ...)"),
    (FusedDropout, (0.1,), "FusedDropout", "make_dropout('reference', p)"),
    (FusedMoEDispatch, (), "FusedMoEDispatch", "make_moe_dispatch('reference')"),
]


@pytest.mark.parametrize("cls, args, name, instead", CELLS, ids=[c[2] for c in CELLS])
def test_other_devices_are_refused_with_the_reference_to_use(monkeypatch, cls, args, name, instead):
    monkeypatch.setattr(_device.ms, "get_context", lambda key: "GPU")
    with pytest.raises(ValueError) as err:
        cls(*args)
    assert str(err.value) == f"{name} supports device_target 'CPU' or 'Ascend', got 'GPU'; use {instead} there"


def test_cpu_and_ascend_are_returned(monkeypatch):
    for device in ("CPU", "Ascend"):
        monkeypatch.setattr(_device.ms, "get_context", lambda key, d=device: d)
        assert _device.kernel_device("X", "y") == device
