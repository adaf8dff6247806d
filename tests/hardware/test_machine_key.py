"""The nightly baseline key tells apart machines whose timings differ (fixture /proc/cpuinfo texts)."""

import pytest

from llm_perf_opt.hardware.machine_key import cpu_key

X86_COMMON = "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr sse sse2 ssse3 sse4_1 sse4_2 avx"


def x86(model_name: str, family: int, model: int, flags: str, processors: int = 2) -> str:
    block = (
        "processor\t: {n}\nvendor_id\t: AuthenticAMD\ncpu family\t: {family}\nmodel\t\t: {model}\n"
        "model name\t: {name}\nstepping\t: 1\nflags\t\t: {flags}\n\n"
    )
    return "".join(
        block.format(n=n, family=family, model=model, name=model_name, flags=f"{X86_COMMON} {flags}")
        for n in range(processors)
    )


ZEN1 = x86("AMD EPYC", 23, 1, "fma avx2")
ZEN3 = x86("AMD EPYC", 25, 1, "fma avx2")
ZEN4 = x86("AMD EPYC", 25, 17, "fma avx2 avx512f avx512bw avx512_bf16")
SAPPHIRE_RAPIDS = x86(
    "Intel(R) Xeon(R) Processor", 6, 143, "avx2 avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8"
)
GRAVITON3 = (
    "processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd evtstrm aes sve sve2 bf16\n"
    "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x1\nCPU part\t: 0xd40\n\n"
)


@pytest.mark.parametrize(
    ("cpuinfo", "cores", "expected"),
    [
        (ZEN1, 2, "cpu-amd-epyc-f23-m1-2c-avx2-no-bf16"),
        (ZEN3, 2, "cpu-amd-epyc-f25-m1-2c-avx2-no-bf16"),
        (ZEN4, 2, "cpu-amd-epyc-f25-m17-2c-avx512-bf16"),
        (SAPPHIRE_RAPIDS, 4, "cpu-intel-r-xeon-r-processor-f6-m143-4c-amx-bf16"),
        (GRAVITON3, 8, "cpu-unknown-i0x41-p0xd40-8c-sve2-bf16"),
    ],
)
def test_each_machine_gets_its_own_key(cpuinfo, cores, expected):
    assert cpu_key(cpuinfo, cores) == expected


def test_zen1_zen3_zen4_and_intel_amx_all_differ_though_amd_reports_one_model_name():
    keys = {cpu_key(text, 2) for text in (ZEN1, ZEN3, ZEN4, SAPPHIRE_RAPIDS)}
    assert len(keys) == 4


def test_the_same_cpu_with_fewer_usable_cores_is_another_machine():
    assert cpu_key(ZEN4, 2) != cpu_key(ZEN4, 16)
    assert "-16c-" in cpu_key(ZEN4, 16)


def test_an_unreadable_cpuinfo_still_gives_a_key():
    assert cpu_key("", 1) == "cpu-unknown-uarch-unknown-1c-isa-unknown-no-bf16"
