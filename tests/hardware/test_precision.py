"""dtype=auto and explicit dtypes, with the capability probes forced both ways."""

from __future__ import annotations

import pytest
import torch

from llm_perf_opt.errors import UserError
from llm_perf_opt.hardware import precision
from llm_perf_opt.hardware.precision import DtypeChoice, choose_dtype, cpu_flags_include, header_text

CPU = torch.device("cpu")
# A CUDA device object needs no GPU; the bf16 probe is injected, so torch.cuda is never asked.
CUDA = torch.device("cuda")


def yes() -> bool:
    return True


def no() -> bool:
    return False


def test_auto_on_a_cpu_with_native_bf16_picks_bf16():
    choice = choose_dtype("auto", CPU, bf16_native=yes)
    assert choice == DtypeChoice(torch.bfloat16, "auto: this CPU computes bf16 natively", None)


def test_auto_on_a_cpu_without_native_bf16_picks_fp32():
    choice = choose_dtype("auto", CPU, bf16_native=no)
    assert choice == DtypeChoice(torch.float32, "auto: this CPU has no native bf16", None)
    assert header_text(choice) == "dtype float32 (auto: this CPU has no native bf16)"


def test_explicit_bf16_on_a_cpu_without_it_runs_with_one_warning_line():
    choice = choose_dtype("bfloat16", CPU, bf16_native=no)
    assert choice.dtype is torch.bfloat16
    assert choice.reason == "requested"
    assert choice.warning == (
        "bfloat16 on this CPU is emulated (no native bf16): expect it to run many times slower "
        "than float32; dtype=auto picks float32"
    )
    assert "\n" not in choice.warning


def test_explicit_bf16_on_a_cpu_with_it_has_no_warning():
    assert choose_dtype("bfloat16", CPU, bf16_native=yes) == DtypeChoice(torch.bfloat16, "requested", None)


def test_explicit_fp16_on_a_cpu_without_it_names_the_faster_auto_choice():
    with_bf16 = choose_dtype("float16", CPU, bf16_native=yes, fp16_native=no)
    without_bf16 = choose_dtype("float16", CPU, bf16_native=no, fp16_native=no)
    assert with_bf16.dtype is without_bf16.dtype is torch.float16
    assert with_bf16.warning.endswith("slower than bfloat16; dtype=auto picks bfloat16")
    assert without_bf16.warning.endswith("slower than float32; dtype=auto picks float32")
    assert choose_dtype("float16", CPU, bf16_native=no, fp16_native=yes).warning is None


def test_explicit_fp32_never_warns():
    assert choose_dtype("float32", CPU, bf16_native=no) == DtypeChoice(torch.float32, "requested", None)


def test_auto_on_cuda_with_bf16_picks_bf16():
    choice = choose_dtype("auto", CUDA, cuda_bf16=yes, bf16_native=no)
    assert choice == DtypeChoice(torch.bfloat16, "auto: CUDA with bf16 support", None)
    assert header_text(choice) == "dtype bfloat16 (auto: CUDA with bf16 support)"


def test_auto_on_cuda_without_bf16_picks_fp16():
    choice = choose_dtype("auto", CUDA, cuda_bf16=no, bf16_native=yes)
    assert choice == DtypeChoice(torch.float16, "auto: this GPU has no native bf16", None)


def test_explicit_bf16_on_a_gpu_without_it_warns():
    choice = choose_dtype("bfloat16", torch.device("cuda", 1), cuda_bf16=no)
    assert choice.dtype is torch.bfloat16
    assert choice.warning.startswith("bfloat16 on this GPU is emulated (no native bf16)")
    assert choose_dtype("float16", CUDA, cuda_bf16=no) == DtypeChoice(torch.float16, "requested", None)


def test_unknown_dtype_is_a_user_error():
    with pytest.raises(UserError, match="dtype='fp8' is not one of auto, bfloat16, float16, float32"):
        choose_dtype("fp8", CPU, bf16_native=yes)


def test_cpu_flags_from_a_cpuinfo_file(tmp_path):
    zen3 = tmp_path / "zen3"
    zen3.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: avx2\n")
    zen4 = tmp_path / "zen4"
    zen4.write_text("processor\t: 0\nflags\t\t: avx2 avx512f avx512bw avx512_bf16 avx512_vnni\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimdhp bf16 sve\n")
    assert cpu_flags_include(precision.BF16_FLAGS, zen3) is False
    assert cpu_flags_include(precision.BF16_FLAGS, zen4) is True
    assert cpu_flags_include(precision.BF16_FLAGS, arm) is True
    assert cpu_flags_include(precision.FP16_FLAGS, zen4) is False
    assert cpu_flags_include(precision.BF16_FLAGS, tmp_path / "absent") is None


def test_torch_probe_wins_over_the_flags(monkeypatch):
    # A Skylake-SP-like machine: no avx512_bf16 flag, but oneDNN's bf16 kernels are available.
    monkeypatch.setattr(precision, "_torch_probe", lambda op: True)
    monkeypatch.setattr(precision, "cpu_flags_include", lambda flags: False)
    assert precision._native("_is_mkldnn_bf16_supported", precision.BF16_FLAGS) is True


def test_flags_decide_where_torch_has_no_probe(monkeypatch):
    monkeypatch.setattr(precision, "_torch_probe", lambda op: None)
    monkeypatch.setattr(precision, "cpu_flags_include", lambda flags: True)
    assert precision._native("_is_mkldnn_bf16_supported", precision.BF16_FLAGS) is True
    monkeypatch.setattr(precision, "cpu_flags_include", lambda flags: None)
    assert precision._native("_is_mkldnn_bf16_supported", precision.BF16_FLAGS) is False


def test_the_real_probe_answers_a_bool_and_is_cached():
    assert isinstance(precision.cpu_bf16_native(), bool)
    assert precision.cpu_bf16_native.cache_info().currsize == 1


def test_a_probe_this_torch_lacks_reads_as_unknown():
    assert precision._torch_probe("_is_mkldnn_no_such_probe") is None
