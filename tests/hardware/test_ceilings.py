"""Datasheet ceilings, GPU name matching and the choice of ceilings for a run."""

from __future__ import annotations

import pytest

from llm_perf_opt.errors import UserError
from llm_perf_opt.hardware.ceilings import (
    datasheet_roof,
    datasheets,
    hardware_options,
    match_gpu,
    select,
    select_for,
)

GIB = 2**30


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("NVIDIA H100 80GB HBM3", "h100_sxm"),
        ("NVIDIA H100 PCIe", "h100_pcie"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-80GB", "a100_80gb"),
        ("NVIDIA A100 80GB PCIe", "a100_80gb_pcie"),
        ("NVIDIA A100-SXM4-40GB", "a100_40gb"),
        ("NVIDIA A100-PCIE-40GB", "a100_40gb"),
        ("NVIDIA L4", "l4"),
        ("NVIDIA L40S", "l40s"),
        ("NVIDIA GeForce RTX 4090", "rtx4090"),
        ("NVIDIA GeForce RTX 3090", "rtx3090"),
        ("NVIDIA B200", "b200"),
    ],
)
def test_real_device_names_match_their_datasheet(name, key):
    assert match_gpu(name, None) == key


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("nvidia h100 pcie", "h100_pcie"),  # case
        ("H100 PCIe", "h100_pcie"),  # no vendor prefix
        ("NVIDIA A100_SXM4_40GB", "a100_40gb"),  # other separators
        ("NVIDIA H100 SXM5 80GB", "h100_sxm"),  # memory descriptor after a shorter pattern
        ("L40S", "l40s"),
    ],
)
def test_matching_ignores_case_separators_and_vendor(name, key):
    assert match_gpu(name, None) == key


@pytest.mark.parametrize(
    "name",
    [
        "NVIDIA H200 NVL",  # lower clocks than the SXM part
        "NVIDIA H100 NVL",
        "NVIDIA GeForce RTX 4090 D",  # fewer SMs
        "NVIDIA GeForce RTX 4090 Laptop GPU",
        "NVIDIA GeForce RTX 3090 Ti",
        "NVIDIA L40",  # not an L4, not an L40S
        "Tesla V100-SXM2-16GB",
        "NVIDIA GeForce GTX 1080",
    ],
)
def test_other_products_are_not_guessed(name):
    assert match_gpu(name, None) is None


def test_properties_break_ties_between_datasheets():
    # A bare "H100" is SXM (132 SMs) or PCIe (114 SMs); a bare "A100" 40 or 80 GB.
    assert match_gpu("NVIDIA H100", None) is None
    assert match_gpu("NVIDIA H100", {"multi_processor_count": 114}) == "h100_pcie"
    sxm_props = {"multi_processor_count": 132, "total_memory": int(79.6 * GIB)}
    assert match_gpu("NVIDIA H100", sxm_props) == "h100_sxm"
    # H100 NVL has 132 SMs but 94 GB: 18% off 80 GB, so no datasheet agrees.
    assert match_gpu("NVIDIA H100", {"multi_processor_count": 132, "total_memory": 94 * GIB}) is None
    assert match_gpu("NVIDIA A100", {"total_memory": int(39.4 * GIB)}) == "a100_40gb"
    # 80 GB could be the SXM or the PCIe card (different bandwidth): still ambiguous.
    assert match_gpu("NVIDIA A100", {"total_memory": int(79.2 * GIB)}) is None


# (bf16 TFLOP/s, fp32 TFLOP/s, GB/s, L2 MB) typed from shared/hardware_peaks.md
PEAKS = {
    "h100_sxm": (989.4, 66.9, 3350, 50),
    "h100_pcie": (756, 51, 2000, 50),
    "h200": (989, 67, 4800, 50),
    "a100_80gb": (312, 19.5, 2039, 40),
    "a100_80gb_pcie": (312, 19.5, 1935, 40),
    "a100_40gb": (312, 19.5, 1555, 40),
    "l40s": (362, 91.6, 864, None),
    "l4": (121, 30.3, 300, 48),
    "rtx4090": (165.2, 82.6, 1008, 72),
    "rtx3090": (71, 35.6, 936, 6),
    "b200": (2250, 80, 8000, 126),
}


@pytest.mark.parametrize("key", sorted(PEAKS))
def test_datasheets_carry_the_table_figures(key):
    bf16, fp32, gbps, l2 = PEAKS[key]
    cfg = datasheets()[key]
    assert cfg.name == key
    assert cfg.peak_tflops == {"bfloat16": bf16, "float16": bf16, "float32": fp32}
    assert cfg.memory_gbps == gbps
    assert cfg.l2_mb == l2
    assert cfg.source


def test_every_option_loads_and_only_gpus_have_figures():
    options = hardware_options()
    assert set(options) == set(PEAKS) | {"auto", "cpu"}
    assert set(datasheets()) == set(PEAKS)
    for key in ("auto", "cpu"):
        assert options[key].peak_tflops == {}
        assert options[key].memory_gbps is None
        assert options[key].gpu_names == []


def test_datasheet_roof_is_in_flop_and_bytes_per_second():
    roof = datasheet_roof("h100_sxm")
    assert roof.label == "datasheet" and roof.source.startswith("h100_sxm: ")
    assert roof.peak("bfloat16") == pytest.approx(989.4e12)  # 989.4 TFLOP/s x 1e12
    assert roof.peak("float32") == pytest.approx(66.9e12)
    assert roof.byte_s == pytest.approx(3.35e12)  # 3,350 GB/s x 1e9
    with pytest.raises(KeyError, match="int8"):
        roof.peak("int8")
    with pytest.raises(UserError, match="no datasheet"):
        datasheet_roof("auto")


def test_auto_on_a_known_gpu_uses_its_datasheet():
    selection = select_for("auto", "cuda", "NVIDIA L4", {"multi_processor_count": 58})
    assert selection.key == "l4"
    assert selection.how == "matched device name 'NVIDIA L4'"
    assert selection.roof.peak("bfloat16") == pytest.approx(121e12)
    assert selection.warning is None


def test_auto_on_an_unknown_gpu_warns_and_has_no_datasheet():
    selection = select_for("auto", "cuda", "NVIDIA Quantum X9", None)
    assert selection.key is None
    assert selection.roof is None
    assert selection.how == "unknown GPU 'NVIDIA Quantum X9'"
    expected = "unknown GPU 'NVIDIA Quantum X9': no datasheet ceilings, using calibrated ones only"
    assert selection.warning == expected


def test_explicit_choice_is_kept_with_a_warning_when_the_device_differs():
    same = select_for("h100_sxm", "cuda", "NVIDIA H100 80GB HBM3", None)
    assert (same.key, same.how, same.warning) == ("h100_sxm", "explicit", None)
    other = select_for("h100_sxm", "cuda", "NVIDIA L4", None)
    assert other.key == "h100_sxm"
    assert other.roof.label == "datasheet" and other.roof.source.startswith("h100_sxm: ")
    assert "NVIDIA L4" in other.warning and "matches l4" in other.warning


def test_cpu_runs_have_no_datasheet():
    for name in ("auto", "cpu"):
        selection = select(name, "cpu")
        assert (selection.key, selection.how, selection.roof, selection.warning) == (None, "cpu", None, None)


@pytest.mark.parametrize(
    ("name", "device_type", "message"),
    [
        ("h100_sxm", "cpu", "run is on the CPU"),
        ("cpu", "cuda", "run is on the GPU"),
        ("tpu_v5", "cuda", "unknown hardware 'tpu_v5'"),
    ],
)
def test_impossible_choices_are_user_errors(name, device_type, message):
    with pytest.raises(UserError, match=message):
        select_for(name, device_type, "NVIDIA L4", None)
