"""Fixtures of the kernel tests: every module runs in GRAPH_MODE (restored afterwards); ``pynative`` switches one
test to PYNATIVE_MODE (fast sweeps of many shapes) and back; ``aot_call`` calls an aot kernel entry point directly;
``unary_grad`` wraps a one-input cell to return its output and input gradient."""
import ctypes

import mindspore as ms
import pytest
from mindspore import nn, ops


class UnaryForwardAndGrad(nn.Cell):
    """``(cell(x), dx)`` of a one-input cell for the cotangent ``dy`` (MindSpore autodiff, either mode)."""

    def __init__(self, cell):
        super().__init__()
        self.cell = cell
        self.grad = ops.GradOperation(sens_param=True)

    def construct(self, x, dy):
        return self.cell(x), self.grad(self.cell)(x, dy)


@pytest.fixture
def unary_grad():
    """:class:`UnaryForwardAndGrad`: ``unary_grad(cell)(x, dy) -> (y, dx)``."""
    return UnaryForwardAndGrad


@pytest.fixture(autouse=True, scope="module")
def graph_mode():
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=previous)


@pytest.fixture
def pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    yield
    ms.set_context(mode=ms.GRAPH_MODE)


@pytest.fixture
def aot_call():
    """``call(fn, arrays, shapes, dtypes, nparam=None) -> return code``: an ``ops.Custom(func_type="aot")`` entry
    point (a ctypes function) called as MindSpore calls it, with the given (possibly inconsistent) shapes/dtypes."""

    def call(fn, arrays, shapes, dtypes, nparam=None):
        n = len(arrays)
        params = (ctypes.c_void_p * n)(*[a.ctypes.data for a in arrays])
        dims = (ctypes.c_int * n)(*[len(s) for s in shapes])
        shp = [(ctypes.c_int64 * max(1, len(s)))(*s) for s in shapes]
        ptrs = (ctypes.POINTER(ctypes.c_int64) * n)(*[ctypes.cast(s, ctypes.POINTER(ctypes.c_int64)) for s in shp])
        names = (ctypes.c_char_p * n)(*[d.encode() for d in dtypes])
        return fn(n if nparam is None else nparam, params, dims, ptrs, names, None, None)

    return call
