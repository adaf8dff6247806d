"""Recording and loading Chrome traces."""

import gzip
import json

import pytest
import torch

from llm_perf_opt.errors import UserError
from llm_perf_opt.profiling.trace import load_trace, record_trace, trace_events


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
