"""Stage timing samples and their summary statistics."""

import numpy as np
import pytest
import torch

from llm_perf_opt.profiling.timing import StageTimer, outliers, summarize
from llm_perf_opt.runners.ranges import listening, module_range, stage_range


class FakeClock:
    """A clock that advances by a scripted step on each reading (seconds)."""

    def __init__(self, steps):
        self._steps = iter(steps)
        self.now = 0.0

    def __call__(self):
        self.now += next(self._steps)
        return self.now


CPU = torch.device("cpu")


def test_cpu_samples_per_top_level_stage_in_milliseconds():
    # Readings: prefill start/end 2 ms apart; decode twice, 1 ms and 3 ms. Nested
    # stage/family ranges take no readings.
    timer = StageTimer(CPU, clock=FakeClock([0.0, 0.002, 0.010, 0.001, 0.0, 0.003]))
    with listening(timer):
        with stage_range("prefill"), module_range("prefill", "attn"):
            pass
        for _ in range(2):
            with stage_range("decode"):
                pass
    samples = timer.samples()
    assert samples == {"prefill": [pytest.approx(2.0)], "decode": [pytest.approx(1.0), pytest.approx(3.0)]}


def test_explicit_region_around_stages_and_returned_copy():
    timer = StageTimer(CPU, clock=FakeClock([0.0, 0.001, 0.002, 0.004]))
    with listening(timer), timer.time("e2e"), stage_range("prefill"):
        pass
    samples = timer.samples()
    assert samples["prefill"] == [pytest.approx(2.0)]
    assert samples["e2e"] == [pytest.approx(7.0)]
    samples["e2e"].append(99.0)
    assert timer.samples()["e2e"] == [pytest.approx(7.0)]


def test_failed_region_records_no_sample():
    timer = StageTimer(CPU)
    with pytest.raises(ValueError), timer.time("prefill"):
        raise ValueError("bad input")
    assert timer.samples() == {}


def test_unsupported_device_is_an_error():
    with pytest.raises(ValueError):
        StageTimer(torch.device("meta"))


class FakeEvent:
    def __init__(self, log, ms):
        self.log, self.ms = log, ms

    def record(self, stream):
        self.log.append(("record", stream))

    def elapsed_time(self, end):
        return end.ms - self.ms


class FakeCuda:
    """Records which device every stream lookup and synchronisation names."""

    def __init__(self):
        self.log = []
        self._clock = 0.0

    def current_stream(self, device=None):
        self.log.append(("current_stream", device))
        return f"stream-of-{device}"

    def Event(self, enable_timing):  # noqa: N802 - mirrors torch.cuda.Event
        assert enable_timing
        self._clock += 1.5
        return FakeEvent(self.log, self._clock)

    def synchronize(self, device=None):
        self.log.append(("synchronize", device))


def test_cuda_events_use_the_model_device_stream_and_sync_that_device():
    cuda = FakeCuda()
    device = torch.device("cuda", 1)
    timer = StageTimer(device, cuda=cuda)
    with listening(timer), stage_range("prefill"):
        pass
    assert ("synchronize", device) not in cuda.log  # nothing waits between stages
    assert timer.samples() == {"prefill": [pytest.approx(1.5)]}
    assert cuda.log == [
        ("current_stream", device),
        ("record", "stream-of-cuda:1"),
        ("current_stream", device),
        ("record", "stream-of-cuda:1"),
        ("synchronize", device),
    ]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_events_time_device_work():
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    timer = StageTimer(device)
    x = torch.randn(1024, 1024, device=device)
    for _ in range(3):
        with timer.time("mm"):
            x @ x
    samples = timer.samples()
    assert len(samples["mm"]) == 3
    assert all(ms > 0 for ms in samples["mm"])


def test_summarize_matches_numpy():
    samples = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 2.5, 3.5, 4.5, 1.5]
    stats = summarize(samples)
    assert stats["n"] == 10
    assert stats["median"] == pytest.approx(np.median(samples))
    assert stats["mean"] == pytest.approx(np.mean(samples))
    assert (stats["min"], stats["max"]) == (1.0, 10.0)
    assert stats["p90"] == pytest.approx(np.percentile(samples, 90))
    assert stats["stdev"] == pytest.approx(np.std(samples, ddof=1))
    assert stats["cv"] == pytest.approx(np.std(samples, ddof=1) / np.mean(samples))
    # The median is 3.25: 10.0 is above 1.5 x 3.25 = 4.875, 5.0 too, 4.5 is not.
    assert stats["outliers"] == [0, 5]


def test_summarize_gives_no_p90_below_ten_samples():
    assert summarize([1.0, 2.0, 3.0])["p90"] is None


def test_summarize_single_sample():
    assert summarize([2.5]) == {
        "n": 1,
        "median": 2.5,
        "mean": 2.5,
        "min": 2.5,
        "max": 2.5,
        "stdev": 0.0,
        "cv": 0.0,
        "p90": None,
        "outliers": [],
    }


def test_outliers_are_runs_above_one_and_a_half_medians():
    # The tiny gundam SAM: 2,854 / 368 / 449 ms; the median is 449, 1.5 x 449 = 673.5.
    assert outliers([2854.0, 368.0, 449.0]) == [0]
    assert outliers([100.0, 149.0, 120.0]) == []


def test_summarize_needs_samples():
    with pytest.raises(ValueError):
        summarize([])
