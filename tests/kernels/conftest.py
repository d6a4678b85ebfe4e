"""Fixtures of the kernel tests: every module runs in GRAPH_MODE (restored afterwards); ``pynative`` switches one
test to PYNATIVE_MODE (fast sweeps of many shapes) and back."""
import mindspore as ms
import pytest


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
