"""Available memory from fake /proc and cgroup trees, and the one-line refusal."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llm_perf_opt.errors import UserError
from llm_perf_opt.hardware.memory_check import available_memory_bytes, check_fits

CPU = torch.device("cpu")
GIB = 1024**3
MEMINFO = "MemTotal:       24684084 kB\nMemFree:        20000000 kB\nMemAvailable:   16000000 kB\n"
MEMINFO_BYTES = 16_000_000 * 1024  # 16,384,000,000 B


def fake_proc(root: Path, cgroup_line: str | None = None) -> Path:
    proc = root / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(MEMINFO)
    if cgroup_line is not None:
        (proc / "self" / "cgroup").write_text(cgroup_line)
    return proc


def write(folder: Path, **files: str) -> None:
    """Write cgroup files; a keyword's first underscore is the file name's dot (memory_max -> memory.max)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("_", ".", 1)).write_text(text)


def test_meminfo_alone(tmp_path):
    proc = fake_proc(tmp_path)
    assert available_memory_bytes(CPU, proc=proc, cgroup=tmp_path / "no-cgroup") == MEMINFO_BYTES


def test_v2_limit_smaller_than_memavailable_wins(tmp_path):
    proc = fake_proc(tmp_path)
    cgroup = tmp_path / "cgroup"
    write(cgroup, cgroup_controllers="memory cpu\n", memory_max=f"{8 * GIB}\n", memory_current=f"{3 * GIB}\n")
    # 8 GiB limit - 3 GiB used = 5 GiB, below MemAvailable's 16.4 GB.
    assert available_memory_bytes(CPU, proc=proc, cgroup=cgroup) == 5 * GIB


def test_v2_max_means_no_limit(tmp_path):
    proc = fake_proc(tmp_path)
    cgroup = tmp_path / "cgroup"
    write(cgroup, cgroup_controllers="memory\n", memory_max="max\n", memory_current=f"{3 * GIB}\n")
    assert available_memory_bytes(CPU, proc=proc, cgroup=cgroup) == MEMINFO_BYTES


def test_v2_page_cache_counts_as_available(tmp_path):
    proc = fake_proc(tmp_path)
    cgroup = tmp_path / "cgroup"
    write(
        cgroup,
        cgroup_controllers="memory\n",
        memory_max=f"{8 * GIB}\n",
        memory_current=f"{7 * GIB}\n",
        memory_stat=f"anon {4 * GIB}\nfile {3 * GIB}\ninactive_file {2 * GIB}\n",
    )
    # 8 GiB - (7 GiB used - 2 GiB reclaimable cache) = 3 GiB.
    assert available_memory_bytes(CPU, proc=proc, cgroup=cgroup) == 3 * GIB


def test_v2_the_tightest_ancestor_wins(tmp_path):
    proc = fake_proc(tmp_path, "0::/job/step\n")
    cgroup = tmp_path / "cgroup"
    write(cgroup, cgroup_controllers="memory\n")
    write(cgroup / "job", memory_max=f"{6 * GIB}\n", memory_current=f"{5 * GIB}\n")
    write(cgroup / "job" / "step", memory_max="max\n", memory_current=f"{2 * GIB}\n")
    # step: unlimited; job: 6 - 5 = 1 GiB (its other children use the rest).
    assert available_memory_bytes(CPU, proc=proc, cgroup=cgroup) == 1 * GIB


def test_v1_limit_and_its_no_limit_value(tmp_path):
    proc = fake_proc(tmp_path, "5:cpu,cpuacct:/\n4:memory:/box\n0::/\n")
    cgroup = tmp_path / "cgroup"
    unlimited = str(9223372036854771712)  # what v1 reports without a limit
    write(cgroup / "memory", memory_limit_in_bytes=unlimited, memory_usage_in_bytes=f"{9 * GIB}")
    write(cgroup / "memory" / "box", memory_limit_in_bytes=f"{4 * GIB}", memory_usage_in_bytes=f"{1 * GIB}")
    # root: no limit; box: 4 - 1 = 3 GiB.
    assert available_memory_bytes(CPU, proc=proc, cgroup=cgroup) == 3 * GIB
    write(cgroup / "memory" / "box", memory_limit_in_bytes=unlimited)
    assert available_memory_bytes(CPU, proc=proc, cgroup=cgroup) == MEMINFO_BYTES


def test_nothing_to_read_is_unknown(tmp_path):
    assert available_memory_bytes(CPU, proc=tmp_path / "none", cgroup=tmp_path / "none") is None


def test_cuda_asks_the_driver_for_that_device(tmp_path):
    asked = []

    class FakeCuda:
        @staticmethod
        def mem_get_info(device):
            asked.append(device)
            return 3 * GIB, 80 * GIB

    device = torch.device("cuda", 1)
    assert available_memory_bytes(device, proc=fake_proc(tmp_path), cuda=FakeCuda) == 3 * GIB
    assert asked == [device]


GB = 10**9


def test_refusal_is_one_line_with_the_figures():
    parts = {"weights": 13_300_000_000, "largest transient": 800_000_000}  # 14.1 GB in all
    with pytest.raises(UserError) as caught:
        check_fits(
            14_100_000_000,
            9_800_000_000,
            what="deepseek_ocr",
            dtype_name="float32",
            suggestions=["dtype=bfloat16", "model=deepseek_ocr_tiny"],
            breakdown=parts,
        )
    assert str(caught.value) == (
        "not enough memory for deepseek_ocr in float32: needs ~14.1 GB (13.3 GB weights + 0.8 GB "
        "largest transient), 9.8 GB available; try dtype=bfloat16 or model=deepseek_ocr_tiny"
    )


def test_small_parts_keep_two_significant_digits():
    with pytest.raises(UserError, match=r"needs ~2\.0 GB \(2\.0 GB weights \+ 0\.041 GB KV cache\), 1\.5 GB"):
        check_fits(
            2 * GB + 41 * 10**6,
            15 * 10**8,
            what="m",
            dtype_name="bfloat16",
            suggestions=[],
            breakdown={"weights": 2 * GB, "KV cache": 41 * 10**6},
        )


def test_enough_memory_passes_and_the_boundary_fits():
    check_fits(10 * GB, 10 * GB, what="m", dtype_name="float32", suggestions=["x"])


def test_a_breakdown_must_add_up():
    with pytest.raises(ValueError, match="breakdown sums to 3 B"):
        check_fits(4, 100, what="m", dtype_name="float32", suggestions=[], breakdown={"a": 1, "b": 2})


def test_a_sweeps_next_job_gets_the_cuda_cache_back(monkeypatch):
    """Between the jobs of an in-process sweep the CUDA allocator's cached blocks are released
    (where CUDA was used), or the next job's free-memory check would count them as taken."""
    from llm_perf_opt.hardware import memory_check

    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    memory_check.release_freed_memory()
    assert emptied == []  # CUDA never used: nothing to release, and no context made
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    memory_check.release_freed_memory()
    assert emptied == [True]
