"""The key that names a CPU's nightly baseline (benchmarks/baselines/<key>/).

Timings are only comparable between machines that run the same kernels at the same speed. The
vendor model name alone does not say so: VMs report "AMD EPYC" for Zen 1, Zen 3 and Zen 4 alike,
whose speeds differ by several times. So the key also holds the CPU family and model (the
microarchitecture), the cores this process may use (the thread pool's width), the widest vector
ISA (which oneDNN kernels run) and whether bf16 is computed natively:

    cpu-amd-epyc-f25-m17-2c-avx512-bf16

    python -m llm_perf_opt.hardware.machine_key [CPUINFO]   # prints this machine's key
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from llm_perf_opt.hardware.precision import BF16_FLAGS

CPUINFO = Path("/proc/cpuinfo")

# Widest first; the first one the flags name is the key's ISA. x86 names from the "flags" line,
# Arm ones from the "Features" line (asimd is Neon).
ISA_FLAGS = (
    ("amx", "amx_tile"),
    ("avx512", "avx512f"),
    ("avx2", "avx2"),
    ("avx", "avx"),
    ("sse4", "sse4_2"),
    ("sve2", "sve2"),
    ("sve", "sve"),
    ("neon", "asimd"),
)


def sanitise(text: str) -> str:
    """Lower case, each run of other characters one '-' (as a directory name)."""
    return "-".join(re.findall(r"[a-z0-9]+", text.lower()))


def first_fields(cpuinfo: str) -> dict[str, str]:
    """The fields of the first processor block of a /proc/cpuinfo text (Arm kernels list the
    model name in a trailing block, so later blocks fill what the first lacks)."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        if sep:
            fields.setdefault(name.strip(), value.strip())
    return fields


def widest_isa(flags: set[str]) -> str:
    return next((isa for isa, flag in ISA_FLAGS if flag in flags), "isa-unknown")


def microarchitecture(fields: dict[str, str]) -> str:
    """x86: the CPU family and model numbers; Arm: the implementer and part codes."""
    if "cpu family" in fields:
        return f"f{fields['cpu family']}-m{fields.get('model', 'unknown')}"
    if "CPU implementer" in fields:
        return f"i{fields['CPU implementer']}-p{fields.get('CPU part', 'unknown')}"
    return "uarch-unknown"


def cpu_key(cpuinfo: str, cores: int) -> str:
    """The baseline key of a CPU described by the text of its /proc/cpuinfo, using `cores` cores."""
    fields = first_fields(cpuinfo)
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    model = fields.get("model name") or fields.get("Hardware") or "unknown"
    bf16 = "bf16" if flags & BF16_FLAGS else "no-bf16"
    parts = (sanitise(model) or "unknown", microarchitecture(fields), f"{cores}c", widest_isa(flags), bf16)
    return "cpu-" + "-".join(sanitise(part) for part in parts)


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, as taskset or a cgroup set it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def this_machine(cpuinfo: Path = CPUINFO) -> str:
    try:
        text = cpuinfo.read_text()
    except OSError:
        text = ""
    return cpu_key(text, usable_cores())


if __name__ == "__main__":
    print(this_machine(Path(sys.argv[1]) if len(sys.argv) > 1 else CPUINFO))
