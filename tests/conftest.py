"""Test session setup: CPU, GRAPH_MODE, markers for NPU-only and multi-process tests."""
import os

import numpy as np
import pytest

os.environ.setdefault("GLOG_v", "3")  # MindSpore: errors only


def pytest_configure(config):
    import mindspore as ms
    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)


def pytest_collection_modifyitems(config, items):
    import mindspore as ms
    on_ascend = ms.get_context("device_target") == "Ascend"
    skip_ascend = pytest.mark.skip(reason="needs an Ascend NPU with CANN (HCCL, fused kernels, semi-auto parallel)")
    for item in items:
        if "ascend" in item.keywords and not on_ascend:
            item.add_marker(skip_ascend)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
