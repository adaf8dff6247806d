"""Stage timing samples and their summary statistics."""

import numpy as np
import pytest
import torch

from llm_perf_opt.errors import UserError
from llm_perf_opt.profiling.timing import StageTimer, summarize


class FakeClock:
    """A clock that advances by a scripted step on each reading (seconds)."""

    def __init__(self, steps):
        self._steps = iter(steps)
        self.now = 0.0

    def __call__(self):
        self.now += next(self._steps)
        return self.now


def test_cpu_samples_per_stage_in_milliseconds():
    # Readings: prefill start/end 2 ms apart; decode twice, 1 ms and 3 ms.
    timer = StageTimer("cpu", clock=FakeClock([0.0, 0.002, 0.010, 0.001, 0.0, 0.003]))
    with timer.time("prefill"):
        pass
    for _ in range(2):
        with timer.time("decode"):
            pass
    samples = timer.samples()
    assert samples == {"prefill": [pytest.approx(2.0)], "decode": [pytest.approx(1.0), pytest.approx(3.0)]}


def test_nested_regions_and_returned_copy():
    timer = StageTimer(torch.device("cpu"), clock=FakeClock([0.0, 0.001, 0.002, 0.004]))
    with timer.time("e2e"):
        with timer.time("prefill"):
            pass
    samples = timer.samples()
    assert samples["prefill"] == [pytest.approx(2.0)]
    assert samples["e2e"] == [pytest.approx(7.0)]
    samples["e2e"].append(99.0)
    assert timer.samples()["e2e"] == [pytest.approx(7.0)]


def test_failed_region_records_no_sample():
    timer = StageTimer("cpu")
    with pytest.raises(ValueError), timer.time("prefill"):
        raise ValueError("bad input")
    assert timer.samples() == {}


@pytest.mark.parametrize("device", ["meta", "no-such-device"])
def test_unsupported_device_is_a_user_error(device):
    with pytest.raises(UserError):
        StageTimer(device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_events_time_device_work():
    timer = StageTimer("cuda")
    x = torch.randn(1024, 1024, device="cuda")
    for _ in range(3):
        with timer.time("mm"):
            x @ x
    samples = timer.samples()
    assert len(samples["mm"]) == 3
    assert all(ms > 0 for ms in samples["mm"])


def test_summarize_matches_numpy():
    samples = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0]
    stats = summarize(samples)
    assert stats["n"] == 6
    assert stats["median"] == pytest.approx(3.5)
    assert stats["mean"] == pytest.approx(np.mean(samples))
    assert (stats["min"], stats["max"]) == (1.0, 10.0)
    assert stats["p90"] == pytest.approx(np.percentile(samples, 90))
    assert stats["stdev"] == pytest.approx(np.std(samples, ddof=1))


def test_summarize_single_sample():
    assert summarize([2.5]) == {"n": 1, "median": 2.5, "mean": 2.5, "min": 2.5, "max": 2.5,
                                "p90": 2.5, "stdev": 0.0}


def test_summarize_needs_samples():
    with pytest.raises(ValueError):
        summarize([])
