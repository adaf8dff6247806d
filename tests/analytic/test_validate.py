"""`python -m llm_perf_opt.analytic.validate` agrees with FlopCounterMode for every case."""

from __future__ import annotations

import subprocess
import sys

from llm_perf_opt.analytic import validate


def test_validate_passes_and_lists_every_case(capsys):
    assert validate.main([]) == 0
    out = capsys.readouterr().out
    for case in validate.cases():
        assert case.name in out
    assert {"tiny", "small", "base", "large", "gundam 1x2", "gundam 2x2", "gundam 2x3", "gundam 3x3"} == {
        c.name for c in validate.cases()
    }
    assert "SAM, 1024^2 view" in out and "lm_head per token" in out
    assert "PASS" in out and "False" not in out


def test_bad_argument_is_one_line_and_non_zero():
    result = subprocess.run(
        [sys.executable, "-m", "llm_perf_opt.analytic.validate", "--text-tokens", "0"],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and "text-tokens" in result.stderr
