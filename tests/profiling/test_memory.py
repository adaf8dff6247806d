"""Measured memory figures: process peak, sampled resident peak over a block, CUDA allocator peaks."""

from __future__ import annotations

import mmap
import threading
import time

import pytest
import torch

from llm_perf_opt.profiling import memory
from llm_perf_opt.profiling.memory import CudaPeaks, MemoryFigures, RssSampler, current_rss_bytes

MB = 1_000_000


def sampler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "rss-sampler"]


def wait_for_samples(sampler: RssSampler, more: int) -> None:
    """Block until the sampler thread has taken `more` further samples (a sync point, not a timing)."""
    target = sampler.samples + more
    deadline = time.monotonic() + 30
    while sampler.samples < target:
        assert time.monotonic() < deadline, "the sampler thread took no samples"
        time.sleep(sampler.interval_s)


def test_peak_rss_is_in_bytes_and_at_least_the_current_rss():
    # The kernel batches per-thread RSS counters (up to 64 pages per thread), so the two readings
    # can differ by a few hundred KiB; a KiB/byte mix-up would be off by a factor of 1024.
    now = current_rss_bytes()
    assert now > 10 * MB  # an interpreter with torch loaded
    assert memory.peak_rss_bytes() >= now - 4 * MB


def test_current_rss_reads_statm_pages(tmp_path):
    statm = tmp_path / "statm"
    statm.write_text("50000 1000 300 10 0 700 0\n")  # size, resident (pages), shared, ...
    page = memory.os.sysconf("SC_PAGE_SIZE")
    assert current_rss_bytes(statm) == 1000 * page


def test_sampler_sees_200_mb_freed_before_the_block_ends():
    # A fresh anonymous mapping with one byte written per page: 200 MB become resident whatever
    # the allocator kept from earlier tests. It is unmapped before the block ends, so only the
    # background thread can have seen it.
    size, page = 200 * MB, mmap.PAGESIZE
    with RssSampler(interval_s=0.005) as sampler:
        buffer = mmap.mmap(-1, size)
        for offset in range(0, size, page):
            buffer[offset] = 1
        # Samples taken while the pages were still being written do not count: wait for two more.
        wait_for_samples(sampler, sampler.samples + 2)
        buffer.close()
    assert sampler.peak_bytes - sampler.start_bytes >= 150 * MB
    assert not sampler.running


def test_a_short_block_has_its_entry_and_exit_samples():
    readings = iter([100, 300])
    with RssSampler(interval_s=60, read_rss=lambda: next(readings)) as sampler:
        pass
    assert (sampler.start_bytes, sampler.peak_bytes, sampler.samples) == (100, 300, 2)


def test_peak_is_the_largest_reading():
    readings = iter([100, 900, 400])

    def read() -> int:
        return next(readings, 200)

    with RssSampler(interval_s=0.001, read_rss=read) as sampler:
        wait_for_samples(sampler, 3)
    assert sampler.peak_bytes == 900


def test_thread_stops_when_the_block_raises():
    sampler = RssSampler(interval_s=0.001)
    with pytest.raises(RuntimeError, match="boom"):
        with sampler:
            assert sampler.running
            raise RuntimeError("boom")
    assert not sampler.running
    assert sampler_threads() == []


def test_a_sampler_measures_one_block():
    sampler = RssSampler()
    with sampler:
        pass
    with pytest.raises(RuntimeError, match="one block"):
        sampler.__enter__()


class FakeCuda:
    """torch.cuda's peak-statistics calls, recorded, with fixed peaks."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def reset_peak_memory_stats(self, device):
        self.calls.append(("reset", device))

    def max_memory_allocated(self, device):
        self.calls.append(("allocated", device))
        return 1000

    def max_memory_reserved(self, device):
        self.calls.append(("reserved", device))
        return 2048


def test_cuda_peaks_pass_the_device_to_every_call():
    cuda = FakeCuda()
    device = torch.device("cuda", 1)
    with CudaPeaks(device, cuda=cuda) as peaks:
        assert cuda.calls == [("reset", device)]
    assert cuda.calls == [("reset", device), ("allocated", device), ("reserved", device)]
    assert (peaks.allocated_bytes, peaks.reserved_bytes) == (1000, 2048)


def test_figures_for_a_cpu_run(monkeypatch):
    monkeypatch.setattr(memory, "peak_rss_bytes", lambda: 5_000)
    readings = iter([1_000, 3_000])
    with RssSampler(interval_s=60, read_rss=lambda: next(readings)) as rss:
        pass
    figures = MemoryFigures.collect(rss=rss).as_dict()
    numbers = {k: v for k, v in figures.items() if k != "sources"}
    assert numbers == {"peak_rss_bytes": 5_000, "timed_rss_peak_bytes": 3_000}
    assert set(figures["sources"]) == {"peak_rss_bytes", "timed_rss_peak_bytes"}
    assert "process lifetime" in figures["sources"]["peak_rss_bytes"]
    assert "timed repeats" in figures["sources"]["timed_rss_peak_bytes"]


def test_figures_for_a_cuda_run(monkeypatch):
    monkeypatch.setattr(memory, "peak_rss_bytes", lambda: 5_000)
    with CudaPeaks(torch.device("cuda", 1), cuda=FakeCuda()) as peaks:
        pass
    figures = MemoryFigures.collect(cuda=peaks).as_dict()
    assert figures["peak_rss_bytes"] == 5_000
    assert (figures["peak_allocated_bytes"], figures["peak_reserved_bytes"]) == (1000, 2048)
    assert "timed_rss_peak_bytes" not in figures
    source = figures["sources"]["peak_allocated_bytes"]
    assert source == "torch.cuda.max_memory_allocated(cuda:1) over the timed repeats"


def test_every_figure_needs_a_source():
    with pytest.raises(ValueError, match="timed_rss_peak_bytes"):
        MemoryFigures(peak_rss_bytes=1, timed_rss_peak_bytes=2, sources={"peak_rss_bytes": "x"})


def test_cuda_peaks_read_before_the_block_ends_are_refused():
    with pytest.raises(ValueError, match="before its block ended"):
        MemoryFigures.collect(cuda=CudaPeaks(torch.device("cuda"), cuda=FakeCuda()))
