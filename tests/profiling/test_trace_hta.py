"""HolisticTraceAnalysis (the `hta` extra) reads the trace a run writes, stage ranges included."""

from __future__ import annotations

import pytest
import torch

from llm_perf_opt.profiling.trace import record_trace
from llm_perf_opt.runners.ranges import stage_range

pytestmark = pytest.mark.filterwarnings("ignore:The inplace keyword")
hta = pytest.importorskip("hta.trace_analysis", reason="the hta extra is not installed")


def test_hta_sees_each_stage_range_around_its_ops(tmp_path):
    def request():
        x = torch.randn(64, 64)
        with stage_range("sam"):
            y = x @ x
        with stage_range("decode"):
            (y + 1).sum()

    record_trace(request, tmp_path / "trace.pt.trace.json", torch.device("cpu"))
    analysis = hta.TraceAnalysis(trace_dir=str(tmp_path))
    trace = analysis.t.get_trace(0)
    symbols = analysis.t.symbol_table.sym_table
    trace = trace.assign(name=[symbols[i] for i in trace["name"]], cat=[symbols[i] for i in trace["cat"]])

    def span(name: str, cat: str):
        (row,) = trace[(trace["name"] == name) & (trace["cat"] == cat)].itertuples()
        return row.ts, row.ts + row.dur

    sam, decode = span("sam", "user_annotation"), span("decode", "user_annotation")
    mm, add = span("aten::mm", "cpu_op"), span("aten::add", "cpu_op")
    assert sam[0] <= mm[0] and mm[1] <= sam[1]
    assert decode[0] <= add[0] and add[1] <= decode[1]
    assert sam[1] <= decode[0]
