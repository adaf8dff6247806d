"""run.json's provenance: which commit of the code ran, or "unknown" outside a git checkout."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

import llm_perf_opt
from llm_perf_opt.report import run_record

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def git(folder: Path, *args: str) -> str:
    env = ["-c", "user.name=t", "-c", "user.email=t@example.com"]
    return subprocess.run(
        ["git", "-C", str(folder), *env, *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def package_in(monkeypatch, folder: Path) -> Path:
    """Make the package look installed in folder/llm_perf_opt."""
    init = folder / "llm_perf_opt" / "__init__.py"
    init.parent.mkdir(parents=True)
    init.write_text("")
    monkeypatch.setattr(llm_perf_opt, "__file__", str(init))
    return init


def test_outside_a_checkout_the_commit_is_unknown(monkeypatch, tmp_path):
    package_in(monkeypatch, tmp_path)
    assert run_record.code_commit() == {"git_commit": "unknown", "git_dirty": None}


def test_an_install_inside_another_repository_is_not_its_commit(monkeypatch, tmp_path):
    # e.g. a virtual environment inside a project's checkout: the package's files are not tracked there.
    git(tmp_path, "init", "-q")
    (tmp_path / "README").write_text("x")
    git(tmp_path, "add", "README")
    git(tmp_path, "commit", "-qm", "one")
    package_in(monkeypatch, tmp_path / "venv")
    assert run_record.code_commit()["git_commit"] == "unknown"


def test_a_checkout_gives_its_commit_and_whether_it_changed(monkeypatch, tmp_path):
    git(tmp_path, "init", "-q")
    init = package_in(monkeypatch, tmp_path)
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-qm", "one")
    head = git(tmp_path, "rev-parse", "HEAD")
    assert run_record.code_commit() == {"git_commit": head, "git_dirty": False}
    init.write_text("changed = True\n")
    assert run_record.code_commit() == {"git_commit": head, "git_dirty": True}


def test_versions_carry_the_commit(monkeypatch, tmp_path):
    package_in(monkeypatch, tmp_path)
    assert run_record.versions()["git_commit"] == "unknown"
