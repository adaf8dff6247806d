"""`llm-perf-opt COMMAND`: the console script dispatches to each tool's main, and every tool explains its options."""

from __future__ import annotations

import argparse
import importlib
import re
from dataclasses import fields
from importlib.metadata import entry_points

import pytest
from cli_helpers import call_main

from llm_perf_opt import console
from llm_perf_opt.config import ProfilingConfig

#: The python -m module of each command, as the README documents them.
MODULES = {
    "run": "llm_perf_opt.run",
    "calibrate": "llm_perf_opt.calibrate",
    "tree": "llm_perf_opt.tree",
    "compare": "llm_perf_opt.compare",
    "summarize": "llm_perf_opt.summarize",
    "report": "llm_perf_opt.report.__main__",
    "validate": "llm_perf_opt.analytic.validate",
}


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    return call_main(monkeypatch, capsys, console.main, "llm-perf-opt", *args)


def test_the_console_script_is_installed():
    (script,) = entry_points(group="console_scripts", name="llm-perf-opt")
    assert script.value == "llm_perf_opt.console:main"
    assert {name: module for name, (module, _) in console.COMMANDS.items()} == MODULES


def test_help_lists_every_command(monkeypatch, capsys):
    code, out, _ = cli(monkeypatch, capsys, "--help")
    assert code == 0
    for name, (_, text) in console.COMMANDS.items():
        assert re.search(rf"^  {name} +{re.escape(text)}$", out, re.MULTILINE), name


def test_an_unknown_command_is_one_line(monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, "profile")
    assert code == 2 and out == ""
    assert err.startswith("error: argument COMMAND: invalid choice: 'profile'") and err.count("\n") == 1


def test_a_command_gets_the_rest_of_the_line(monkeypatch, capsys, tmp_path):
    # summarize's own one-line refusal of a dir that is no sweep: its main ran with this argument.
    code, _, err = cli(monkeypatch, capsys, "summarize", str(tmp_path / "none"))
    assert code == 2 and err.startswith("error: ") and str(tmp_path / "none") in err


def test_run_help_shows_the_main_options(monkeypatch, capsys):
    code, out, _ = cli(monkeypatch, capsys, "run", "--help")
    assert code == 0
    documented = dict(re.findall(r"^  (-m|[\w./]+)[= ](\S*)\s", out, re.MULTILINE))
    for key in (
        "model",
        "mode",
        "image",
        "device",
        "dtype",
        "max_new_tokens",
        "hardware",
        "model.impl",
        "model.weights",
        "profiling",
        "hydra/callbacks",
        "-m",
    ):
        assert key in documented, key
    # Each profiling option with the default the schema gives it.
    for field in fields(ProfilingConfig):
        default = (
            "null" if field.default is None else str(field.default).lower()
        )  # as YAML and Hydra write it
        assert documented[f"profiling.{field.name}"] == default, field.name
    assert "llm-perf-opt run model=deepseek_ocr_tiny mode=gundam" in out  # an example
    assert "mode: base, gundam, large, small, tiny" in out  # Hydra's listing of the config groups


def test_tree_help_names_depth(monkeypatch, capsys):
    code, out, _ = cli(monkeypatch, capsys, "tree", "--help")
    assert code == 0 and "--depth N" in out and "OVERRIDE" in out


@pytest.mark.parametrize("command", [name for name in MODULES if name != "run"])
def test_every_flag_of_every_tool_has_a_one_line_help(monkeypatch, capsys, command):
    parser = importlib.import_module(MODULES[command]).build_parser()
    actions = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    assert actions
    for action in actions:
        assert action.help and "\n" not in action.help, (command, action.dest)
    code, out, _ = cli(monkeypatch, capsys, command, "--help")
    assert code == 0
    for action in actions:
        for name in action.option_strings or [action.metavar or action.dest]:
            assert name in out, (command, name)
