"""The host setup a job records: the threads it runs with and where the number comes from, the
cores it may use, and a config whose allocator is not the one the process started with."""

from __future__ import annotations

import os

import pytest
import torch

from llm_perf_opt import allocator
from llm_perf_opt.errors import UserError
from llm_perf_opt.hardware.host import IN_PROCESS, cpu_ranges, host_setup, own_cpus, using_threads


def test_threads_come_from_the_config_then_openmp_then_the_affinity(monkeypatch):
    monkeypatch.setattr(allocator, "_started", None)
    cores = len(os.sched_getaffinity(0))  # Linux, where the tests run
    assert (host_setup("tuned", 3, {"OMP_NUM_THREADS": "1"}).threads_from) == "cpu.threads"
    assert host_setup("tuned", 3, {}).threads == 3
    omp = host_setup("tuned", None, {"OMP_NUM_THREADS": "2,1"})  # OpenMP's nested list: the first level
    assert (omp.threads, omp.threads_from) == (2, "OMP_NUM_THREADS")
    own = host_setup("tuned", None, {"OMP_NUM_THREADS": "many"})
    assert (own.threads, own.threads_from) == (cores, "affinity")


def test_the_record_names_the_allocator_in_force_and_the_environment(monkeypatch):
    monkeypatch.setattr(allocator, "_started", None)
    environ = {"GLIBC_TUNABLES": ":".join(allocator.TUNED), "MKL_NUM_THREADS": "4"}
    record = host_setup("system", None, environ).record()
    assert (record["allocator"], record["in_force"], record["applied"]) == ("system", "tuned", IN_PROCESS)
    assert record["environment"] == {
        "OMP_NUM_THREADS": None,
        "MKL_NUM_THREADS": "4",
        "GLIBC_TUNABLES": environ["GLIBC_TUNABLES"],
        "LD_PRELOAD": None,
    }
    assert record["affinity"] == cpu_ranges(sorted(os.sched_getaffinity(0))) == cpu_ranges(own_cpus())


def test_an_allocator_the_process_did_not_start_with_is_refused(monkeypatch):
    monkeypatch.setattr(allocator, "_started", allocator.Started("tuned", "already in force"))
    assert host_setup("tuned", None, {}).applied == "already in force"
    with pytest.raises(UserError, match="cpu.allocator=system comes from the config.*started with tuned"):
        host_setup("system", None, {})


def test_cpu_ranges():
    assert cpu_ranges([0, 1, 2, 3, 8, 10, 11]) == "0-3,8,10-11"
    assert cpu_ranges([5]) == "5"


def test_threads_are_set_for_the_block_and_set_back():
    before = torch.get_num_threads()
    with using_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
