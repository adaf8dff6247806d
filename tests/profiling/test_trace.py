"""Recording and loading Chrome traces."""

import gzip
import json
import os
import subprocess
import sys

import pytest
import torch

from llm_perf_opt.errors import UserError
from llm_perf_opt.profiling.trace import load_trace, record_trace, trace_events

# Kineto prints from C++ straight to file descriptor 2 and reads its level once per process: a fresh one.
TRACE_ONCE = (
    "import sys, torch; from llm_perf_opt.profiling.trace import record_trace; "
    "record_trace(lambda: torch.ones(8).sum(), sys.argv[1], torch.device('cpu'))"
)


def _trace_stderr(tmp_path, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KINETO_")}
    proc = subprocess.run(
        [sys.executable, "-c", TRACE_ONCE, str(tmp_path / "t.json")],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return proc.stderr


def test_the_profiler_prints_nothing_unless_the_user_asks(tmp_path):
    assert _trace_stderr(tmp_path) == ""
    # The lines the default hides, shown at the level a user chose: the variable is what silences them.
    assert "profiler_start" in _trace_stderr(tmp_path, KINETO_LOG_LEVEL="0")


def test_profiler_options_add_shapes_memory_and_stacks(tmp_path):
    def events(name: str, **options: bool) -> list[dict]:
        return load_trace(
            record_trace(lambda: torch.ones(8).sum(), tmp_path / name, torch.device("cpu"), **options)
        )

    plain = events("plain.json")
    full = events("full.json", record_shapes=True, profile_memory=True, with_stack=True)
    ones = [e for e in full if e.get("name") == "aten::ones"]
    assert ones and ones[0]["args"]["Input Dims"] == [[], [], [], [], []]  # size list and four optional args
    assert any(e.get("name") == "[memory]" for e in full)
    assert any(e.get("cat") == "python_function" for e in full)
    assert not any("Input Dims" in e.get("args", {}) or e.get("name") == "[memory]" for e in plain)
    assert not any(e.get("cat") == "python_function" for e in plain)


def test_record_trace_writes_a_loadable_trace(tmp_path):
    path = record_trace(lambda: torch.ones(8).sum(), tmp_path / "out" / "trace.json", torch.device("cpu"))
    assert path == tmp_path / "out" / "trace.json"
    names = {e.get("name") for e in load_trace(path)}
    assert "aten::sum" in names
    assert [p.name for p in path.parent.iterdir()] == ["trace.json"]  # no temp file left


def test_record_trace_keeps_the_previous_trace_when_fn_fails(tmp_path):
    path = tmp_path / "trace.json"
    path.write_text('{"traceEvents": []}')

    def fail():
        raise RuntimeError("model failed")

    with pytest.raises(RuntimeError):
        record_trace(fail, path, torch.device("cpu"))
    assert path.read_text() == '{"traceEvents": []}'
    assert [p.name for p in tmp_path.iterdir()] == ["trace.json"]


def test_gzipped_trace(tmp_path):
    path = record_trace(lambda: torch.ones(8).sum(), tmp_path / "trace.json.gz", torch.device("cpu"))
    with gzip.open(path, "rt") as f:
        assert json.load(f)["traceEvents"]
    assert any(e.get("name") == "aten::sum" for e in load_trace(path))


@pytest.mark.parametrize("content", ["not json", '{"no": "events"}', "[1, 2"])
def test_bad_trace_files_are_user_errors(tmp_path, content):
    path = tmp_path / "trace.json"
    path.write_text(content)
    with pytest.raises(UserError):
        load_trace(path)


def test_missing_trace_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_trace(tmp_path / "missing.json")


def test_trace_events_accepts_a_bare_event_list():
    events = [{"ph": "X", "name": "a"}]
    assert trace_events(events) is events
    assert trace_events({"traceEvents": events}) is events


def test_graph_tracing_is_prepared_before_capture_on_cuda_only(monkeypatch):
    """TEARDOWN_CUPTI=0 and one profiler session started, on CUDA; off CUDA nothing at all."""
    from llm_perf_opt.profiling import trace

    started = []

    class Recorded:
        def __init__(self, activities):
            started.append(set(activities))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    monkeypatch.setattr(trace, "profile", Recorded)
    monkeypatch.delenv("TEARDOWN_CUPTI", raising=False)
    trace.prepare_graph_tracing(torch.device("cpu"))
    assert started == [] and "TEARDOWN_CUPTI" not in os.environ
    trace.prepare_graph_tracing(torch.device("cuda", 0))
    assert os.environ["TEARDOWN_CUPTI"] == "0"
    assert started == [{trace.ProfilerActivity.CPU, trace.ProfilerActivity.CUDA}]
