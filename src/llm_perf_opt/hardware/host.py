"""How the host ran a job: the memory allocator in force and how it got there, the intra-op
threads, the cores this process may use, and the OpenMP/MKL settings of its environment.

    host = host_setup(run.cpu.allocator, run.cpu.threads)   # UserError: not the allocator the process started with
    with using_threads(host.threads):
        ...                           # the job
    record["cpu"] = host.record()
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from llm_perf_opt import allocator
from llm_perf_opt.errors import UserError

#: What run.json says of a job run in-process, where no entry point chose the allocator.
IN_PROCESS = (
    "not applied: a job run in-process keeps the process's allocator (the command-line entry points set "
    "it when the process starts)"
)
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class HostSetup:
    allocator: str  # what the config asks for
    in_force: str  # what this process runs with
    applied: str  # how it came to be in force
    threads: int  # intra-op threads the job runs with
    threads_from: str  # cpu.threads, OMP_NUM_THREADS or affinity
    affinity: str  # the CPUs this process may run on, as ranges ("0-3,8")
    environment: dict[str, str | None]  # OMP_NUM_THREADS, MKL_NUM_THREADS, GLIBC_TUNABLES, LD_PRELOAD

    def record(self) -> dict:
        return dataclasses.asdict(self)


def host_setup(wanted: str, threads: int | None, environ: Mapping[str, str] = os.environ) -> HostSetup:
    """The host setup of a job asking for allocator ``wanted`` and ``threads`` (cpu.allocator,
    cpu.threads) in this process."""
    started = allocator.started()
    if started is not None and started.allocator != wanted:
        raise UserError(
            f"cpu.allocator={wanted} comes from the config, but this process started with "
            f"{started.allocator}: the allocator is set when the process starts, from the command line; "
            f"give cpu.allocator={wanted} there"
        )
    cores = own_cpus()
    threads, source = _threads(threads, environ, len(cores))
    return HostSetup(
        allocator=wanted,
        in_force=allocator.in_force(environ),
        applied=IN_PROCESS if started is None else started.how,
        threads=threads,
        threads_from=source,
        affinity=cpu_ranges(cores),
        environment={key: environ.get(key) for key in (*THREAD_VARIABLES, "GLIBC_TUNABLES", "LD_PRELOAD")},
    )


@contextmanager
def using_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set for the block, and set back after it (a sweep's next job, a test)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def own_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity; every CPU where the OS has no such call)."""
    affinity = getattr(os, "sched_getaffinity", None)  # Linux; not on macOS
    return sorted(affinity(0)) if affinity else list(range(os.cpu_count() or 1))


def cpu_ranges(cpus: list[int]) -> str:
    """Sorted CPU numbers as ranges: [0, 1, 2, 3, 8] -> "0-3,8"."""
    ranges: list[list[int]] = []
    for cpu in cpus:
        if ranges and cpu == ranges[-1][1] + 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def _threads(asked: int | None, environ: Mapping[str, str], cores: int) -> tuple[int, str]:
    if asked is not None:
        return asked, "cpu.threads"
    value = environ.get("OMP_NUM_THREADS", "")
    # OpenMP's own syntax allows a list ("4,2": nested levels); its first level is the intra-op count.
    first = value.split(",")[0].strip()
    if first.isdigit() and int(first) > 0:
        return int(first), "OMP_NUM_THREADS"
    return cores, "affinity"
