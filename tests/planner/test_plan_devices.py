"""devices.yaml: every figure sourced, strict loading, clear errors, derivable peaks."""
import pytest
import yaml

from ms_llm.planner import Layout, get_device, known_devices, load_devices
from ms_llm.planner.devices import DEFAULT_PATH, _FIGURES


def test_required_devices_present_with_a_source_for_every_figure():
    names = set(known_devices())
    assert {"910A", "910B2", "910B3", "V100", "A100-80GB"} <= names
    with open(DEFAULT_PATH) as fh:
        raw = yaml.safe_load(fh)["devices"]
    for name, entry in raw.items():
        for key in _FIGURES:
            if key in entry:
                assert entry[key]["source"].strip(), (name, key)
        spec = get_device(name)
        assert spec.sources.keys() >= {k for k in _FIGURES if k in entry}


def test_aliases_and_case():
    assert get_device("910B").name == "910B2"
    assert get_device("a100").name == "A100-80GB"
    assert get_device("ascend910").name == "910A"
    spec = get_device("V100")
    assert get_device(spec) is spec


def test_unknown_device_lists_the_known_ones():
    with pytest.raises(ValueError) as err:
        get_device("H100")
    for name in known_devices():
        assert name in str(err.value)


def test_ascend_peaks_follow_cann_platform_config():
    # peak = AI cores x 16*16*16 MAC x 2 FLOP x cube frequency (CANN platform_config *.ini)
    assert get_device("910B2").peak_tflops["fp16"] == pytest.approx(24 * 4096 * 2 * 1.8e9 / 1e12, abs=0.05)
    assert get_device("910B3").peak_tflops["bf16"] == pytest.approx(20 * 4096 * 2 * 1.8e9 / 1e12, abs=0.05)
    assert get_device("910B2").hbm_bytes == 68719476736          # Ascend910B2.ini memory_size


def test_missing_rate_is_a_clear_error():
    with pytest.raises(ValueError, match="V100.*no bf16"):
        get_device("V100").peak_flops("bf16")
    with pytest.raises(ValueError, match="910A.*no fp32"):
        get_device("910A").peak_flops("fp32")
    assert get_device("A100").peak_flops("fp32") == 19.5e12


def test_group_bandwidth_follows_rank_layout():
    a100 = get_device("A100")
    assert a100.group_bandwidth(1, 1)[1] == "none"
    assert a100.group_bandwidth(8, 1) == (300e9, "intra-node")
    assert a100.group_bandwidth(2, 8) == (25e9, "inter-node")    # e.g. dp=2 behind tp=8
    a = get_device("910A")
    assert a.group_bandwidth(4, 1) == (90e9, "intra-node")
    assert a.group_bandwidth(2, 4) == (32e9, "intra-node (cross-group)")


def _write(tmp_path, devices):
    p = tmp_path / f"devices{len(list(tmp_path.iterdir()))}.yaml"
    p.write_text(yaml.safe_dump({"devices": devices}))
    return str(p)


def _good():
    fig = lambda v: {"value": v, "source": "test"}  # noqa: E731
    return {"X1": {"calibrated": False, "peak_fp16_tflops": fig(100), "hbm_gib": fig(16),
                   "hbm_bandwidth_gbs": fig(500), "devices_per_node": fig(8), "intra_node_bandwidth_gbs": fig(100),
                   "inter_node_bandwidth_gbs": fig(10), "matmul_efficiency": fig(0.5)}}


def test_loader_rejects_unsourced_or_malformed_figures(tmp_path):
    specs, _ = load_devices(_write(tmp_path, _good()))
    assert specs["X1"].peak_tflops == {"fp16": 100.0, "bf16": None, "fp32": None}
    bad = _good()
    bad["X1"]["hbm_gib"] = {"value": 16}
    with pytest.raises(ValueError, match="X1.hbm_gib"):
        load_devices(_write(tmp_path, bad))
    bad = _good()
    bad["X1"]["matmul_efficiency"] = {"value": 1.5, "source": "s"}
    with pytest.raises(ValueError, match="matmul_efficiency must be in"):
        load_devices(_write(tmp_path, bad))
    bad = _good()
    bad["X1"]["hbm_gbi"] = {"value": 1, "source": "s"}
    with pytest.raises(ValueError, match="unknown key"):
        load_devices(_write(tmp_path, bad))
    bad = _good()
    del bad["X1"]["inter_node_bandwidth_gbs"]
    with pytest.raises(ValueError, match="lacks 'inter_node_bandwidth_gbs'"):
        load_devices(_write(tmp_path, bad))


def test_layout_rejects_bad_values():
    with pytest.raises(ValueError, match="layout.recompute"):
        Layout(dp=1, recompute="some")
    with pytest.raises(ValueError, match="layout.tp"):
        Layout(dp=1, tp=0)
    with pytest.raises(ValueError, match="layout.dtype"):
        Layout(dp=1, dtype="int8")
