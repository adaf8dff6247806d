#!/usr/bin/env python3
"""The GPU half checked in one command (`make gpu-check`): one markdown file of what it found.

On a machine with one CUDA GPU and the project installed (no internet needed), in at most
`--budget` seconds (default 480), it runs and records:

1. calibrate (`python -m llm_perf_opt.calibrate --refresh`) and the datasheet it matched;
2. base and gundam for model.impl=reference and fast: TTFT, TPOT, per stage wall vs busy
   (device kernel time of the trace pass), trace coverage, the fast paths chosen;
3. whether the CUDA-graph decode (fast) is attributed to `decode` (kernels replayed from the
   graph counted in decode's busy time);
4. parity of the GPU formulations against the reference on the tiny model: folded SAM
   attention, grouped-GEMM experts, CUDA-graph decode (vision output and prefill logits max
   difference, greedy tokens equal; fp32 tokens must be equal, bf16 may diverge on dummy
   weights, whose logits are near ties);
5. the configurations the main runs do not reach, each one short fast job: DeepSeek-OCR-2, a
   batch of 2, `profiling.warmup=0` (its TTFT against the warm job's: a graph captured in a
   timed range would show there), `model.attn_impl=flash_attn` where flash_attn imports, a
   second GPU (`cuda:1`) where there is one, Nsight Compute (runners/ncu_stages.sh) where `ncu`
   is on PATH;
6. an Nsight Systems capture and `report --from-nsys` of it (runners/nsys_profile.sh) when
   `nsys` is on PATH, else one line saying so;
7. `python -m llm_perf_opt.compare` of the two implementations (base mode);
8. what was not checked here, and why.

Every step records its own failure (an exception's traceback tail included) and the check goes
on; a job the time budget cut short is "not run (budget)", not failed. Each job runs in its own
session and its whole process group is ended on a timeout (nsys and ncu start their own
children). The exit status is 1 if any step failed. Without a CUDA GPU it prints one line and
exits 0. `--device cpu --model deepseek_ocr_tiny` runs the same steps on the CPU (how the
tests check this script). It needs no install: it puts the tree's src/ first on its own path
and on its jobs'.

    python runners/gpu_check.py                       # writes outputs/gpu-check/<time>/gpu-check.md
    python runners/gpu_check.py --out gpu-check.md --budget 300
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

#: The tree's sources, first on the path of this script and of every job it starts, so that a
#: bare copy of the working tree (nothing installed) checks its own code.
SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

import torch  # noqa: E402

from llm_perf_opt.atomic import write_text  # noqa: E402

IMPLS = ("reference", "fast")
#: The columns of stages.csv the wall-vs-busy table shows.
STAGE_COLUMNS = ("stage", "time_ms", "busy_ms", "launches", "calibrated_pct_roof_wall", "calibrated_bound")
#: Lines of a failure's output or traceback kept in the file.
TAIL_LINES = 15
#: Seconds a job's process group gets to end after SIGTERM before SIGKILL.
GRACE_S = 10
#: Graph-replayed decode steps must be credited this share of the kernels of the same steps
#: launched one by one (the "static" decode: the same positioned step, eager), and no more
#: than its inverse.
LAUNCH_RATIO = 0.9


class Check:
    """The markdown being written, the deadline, and which steps failed."""

    def __init__(self, out: Path, budget_s: float) -> None:
        self.out = out
        self.deadline = time.monotonic() + budget_s
        self.lines: list[str] = []
        self.failed: list[str] = []
        self.skipped: list[str] = []
        self.unchecked: list[str] = []  # what this machine or this check could not reach

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def add(self, *lines: str) -> None:
        self.lines += lines
        write_text(self.out, "\n".join(self.lines) + "\n")  # what is done so far survives a kill

    def step(self, title: str, body: Callable[[], list[str]], *, needs_s: float = 0) -> None:
        """One section; a step that raises or would overrun the budget is recorded as such."""
        print(f"gpu-check: {title}", flush=True)
        self.add(f"## {title}", "")
        if self.left() < needs_s:
            self.skipped.append(title)
            self.add(
                f"**not run (budget)**: {self.left():.0f} s of the budget left, it needs about {needs_s:.0f} s",
                "",
            )
            return
        start = time.monotonic()
        try:
            lines = body()
        except OutOfBudget as exc:
            self.skipped.append(title)
            lines = [f"**not run (budget)**: {exc}"]
        except StepFailed as exc:
            self.failed.append(title)
            lines = [f"**failed**: {exc}"]
        except Exception as exc:  # a bug of the check or of the code it calls: recorded, the check goes on
            self.failed.append(title)
            lines = [f"**failed**: {type(exc).__name__}: {exc}", "", *fenced(tail(traceback.format_exc()))]
        self.add(*lines, "", f"_{time.monotonic() - start:.0f} s_", "")

    def job_timeout(self, cap_s: float) -> tuple[float, bool]:
        """The seconds a job may take, and whether the budget (not `cap_s`) is what limits it."""
        left = self.left()
        return min(left, cap_s), left < cap_s

    def verdict(self) -> str:
        if not self.failed and not self.skipped:
            return "all steps passed"
        parts = [f"failed: {', '.join(self.failed)}" if self.failed else ""]
        parts.append(f"not run (budget): {', '.join(self.skipped)}" if self.skipped else "")
        return "; ".join(filter(None, parts))


class StepFailed(Exception):
    pass


class OutOfBudget(Exception):
    """A step or job the time budget left no room for, or cut short."""


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment with the tree's src/ first on PYTHONPATH (jobs import the code checked)."""
    path = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **(extra or {})}


def tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run(
    cmd: Sequence[str],
    timeout_s: float,
    env: dict[str, str] | None = None,
    *,
    budget_bound: bool = False,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """A subprocess in its own session with its output captured. On a timeout (or an interrupt
    of this script) its whole process group is ended, not only its first process. Raises
    OutOfBudget if it ran past a timeout the budget set (`budget_bound`), StepFailed past another
    or, with `check`, on a non-zero exit."""
    shown = " ".join(map(str, cmd))
    proc = subprocess.Popen(
        list(map(str, cmd)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env or child_env(),
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=max(timeout_s, 1))
    except subprocess.TimeoutExpired:
        end_group(proc)
        if budget_bound:
            raise OutOfBudget(f"`{shown}` cut short by the budget after {timeout_s:.0f} s") from None
        raise StepFailed(f"`{shown}` ran past {timeout_s:.0f} s") from None
    except BaseException:
        end_group(proc)
        raise
    if check and proc.returncode != 0:
        raise StepFailed(f"`{shown}` exited {proc.returncode}:\n\n```\n{tail(err or out)}\n```")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def end_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group, SIGKILL to what is left of it after GRACE_S (the leader may
    have ended and left its children running: nsys's Python, ncu's)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.communicate(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def fenced(text: str) -> list[str]:
    return ["```", text.rstrip(), "```"]


def table(rows: list[dict], columns: Sequence[str]) -> list[str]:
    def cell(v) -> str:
        if isinstance(v, float):
            return "-" if v != v else f"{v:,.4g}"
        return "-" if v is None else str(v)

    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + [
        "| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows
    ]


# -- the steps --------------------------------------------------------------------------------


def calibrate(args: argparse.Namespace, check: Check) -> list[str]:
    cmd = [sys.executable, "-m", "llm_perf_opt.calibrate", "--device", args.device]
    timeout, bound = check.job_timeout(120)
    proc = run(cmd + (["--refresh"] if args.device.startswith("cuda") else []), timeout, budget_bound=bound)
    return [f"`python {' '.join(cmd[1:])}`", "", *fenced(proc.stdout)]


def harness_job(check: Check, job: Path, overrides: Sequence[str], cap_s: float) -> dict:
    """One `llm_perf_opt.run` job into `job`; its run.json."""
    timeout, bound = check.job_timeout(cap_s)
    run(
        [sys.executable, "-m", "llm_perf_opt.run", *overrides, f"hydra.run.dir={job}"],
        timeout,
        budget_bound=bound,
    )
    return json.loads((job / "run.json").read_text())


def jobs_outcome(problems: list[str], cut: list[str], lines: list[str]) -> list[str]:
    """The lines of a step of several jobs; raises StepFailed if one failed, else OutOfBudget if
    the budget cut one short (the lines of the others kept in the message)."""
    if problems or cut:
        body = "\n".join(problems + [f"- not run (budget): {c}" for c in cut]) + "\n\n" + "\n".join(lines)
        raise (StepFailed if problems else OutOfBudget)(body)
    return lines


def harness_runs(args: argparse.Namespace, check: Check, runs_dir: Path) -> list[str]:
    """Both implementations in each mode, one process per job (two full models at once may not
    fit); a failed job is recorded and the others still run."""
    lines, rows, problems, cut = [], [], [], []
    for mode in args.modes:
        for impl in IMPLS:
            job = runs_dir / f"{mode}_{impl}"
            overrides = [
                f"model={args.model}",
                f"mode={mode}",
                f"model.impl={impl}",
                f"device={args.device}",
                f"max_new_tokens={args.max_new_tokens}",
            ]
            try:
                record = harness_job(check, job, overrides, args.job_timeout)
            except OutOfBudget as exc:
                cut.append(f"{mode} {impl}: {exc}")
                continue
            except StepFailed as exc:
                problems.append(f"- {mode} {impl}: {exc}")
                continue
            rows.append(job_row(mode, impl, record))
            lines += [f"### {mode}, model.impl={impl}", "", *stage_rows(job), ""]
            execution = record.get("execution") or {}
            lines += [
                f"- {execution.get('summary', 'no execution record')}",
                *(f"- {note}" for note in execution.get("notes", [])),
                "",
            ]
    head = table(
        rows, ("mode", "impl", "dtype", "TTFT ms", "TPOT ms", "decode tok/s", "coverage %", "hardware")
    )
    return jobs_outcome(problems, cut, head + [""] + lines)


def job_row(mode: str, impl: str, record: dict) -> dict:
    summary = record["timing"]["summary"]
    trace = record.get("trace") or {}
    tpot = summary.get("tpot_ms") or {}
    return {
        "mode": mode,
        "impl": impl,
        "dtype": record["dtype"],
        "TTFT ms": summary["ttft_ms"]["median"],
        "TPOT ms": tpot.get("median"),
        "decode tok/s": (summary.get("decode_tokens_per_s") or {}).get("median"),
        "coverage %": None if trace.get("coverage") is None else 100 * trace["coverage"],
        "hardware": (record.get("hardware") or {}).get("datasheet"),
    }


def stage_rows(job: Path) -> list[str]:
    import pandas as pd

    stages = pd.read_csv(job / "stages.csv")
    columns = [c for c in STAGE_COLUMNS if c in stages.columns]
    return table(stages[columns].to_dict("records"), columns)


def decode_row(job: Path) -> dict:
    """decode's row of a job's stages.csv: busy_ms, launches, calls (steps per run)."""
    import pandas as pd

    return pd.read_csv(job / "stages.csv").set_index("stage").loc["decode"].to_dict()


def launches_per_step(row: dict) -> float | None:
    launches, steps = row.get("launches"), row.get("calls")
    if launches is None or launches != launches or not steps or steps != steps:
        return None
    return launches / steps


def compare_launches(graph: dict, eager: dict) -> tuple[bool, list[str]]:
    """Whether graph-replayed decode steps are credited the kernels of the same steps launched
    one by one: kernels per decode step of each, and their ratio within LAUNCH_RATIO."""
    g, e = launches_per_step(graph), launches_per_step(eager)
    lines = [
        f"- kernels per decode step: {'-' if g is None else f'{g:,.1f}'} replayed from the graph, "
        f"{'-' if e is None else f'{e:,.1f}'} launched one by one (the static decode: the same step, eager)"
    ]
    if g is None or e is None or e == 0:
        return False, lines + ["- a count is missing: the replayed kernels cannot be compared"]
    ratio = g / e
    ok = LAUNCH_RATIO <= ratio <= 1 / LAUNCH_RATIO
    lines.append(
        f"- ratio {ratio:.3f}: "
        + ("the replays' kernels are in decode" if ok else f"outside {LAUNCH_RATIO}–{1 / LAUNCH_RATIO:.2f}")
    )
    return ok, lines


def graph_attribution(args: argparse.Namespace, check: Check, runs_dir: Path) -> list[str]:
    """The fast base job's decode against the same job with the static (eager) decode: the trace
    pass must credit decode with the kernels its graph replays, as many per step as the eager
    steps launch."""
    job = runs_dir / f"{args.modes[0]}_fast"
    if not (job / "stages.csv").is_file():
        raise StepFailed(f"{job} did not finish: nothing to look at")
    record = json.loads((job / "run.json").read_text())
    decode = decode_row(job)
    paths = (record.get("execution") or {}).get("paths") or {}
    lines = [
        f"- decode form: {paths.get('decode')}; decode busy {decode['busy_ms']:.2f} ms of "
        f"{decode['time_ms']:.2f} ms wall, {decode['launches']} launches"
    ]
    if paths.get("decode") != "graph":
        check.unchecked.append("graph attribution: the fast paths here did not take CUDA-graph decode")
        return lines + [
            "- the fast paths here did not take CUDA-graph decode: attribution of replays not checked"
        ]
    eager_job = runs_dir / f"{args.modes[0]}_fast_static"
    harness_job(
        check,
        eager_job,
        [
            f"model={args.model}",
            f"mode={args.modes[0]}",
            "model.impl=fast",
            "model.paths.decode=static",
            f"device={args.device}",
            f"max_new_tokens={args.max_new_tokens}",
        ],
        args.job_timeout,
    )
    ok, compared = compare_launches(decode, decode_row(eager_job))
    if not ok or not decode["busy_ms"] > 0:
        raise StepFailed("\n".join(lines + compared))
    return lines + compared


def extra_configs(args: argparse.Namespace) -> list[tuple[str, list[str] | None, str]]:
    """(name, overrides, why not) of the configurations the main runs do not reach; overrides
    None where this machine cannot run one (`why not` says why)."""
    tiny = args.model.endswith("_tiny")
    mode = args.modes[0]
    base = [
        f"mode={mode}",
        "model.impl=fast",
        f"max_new_tokens={min(args.max_new_tokens, 8)}",
        "profiling.repeats=2",
    ]
    own = [f"model={args.model}", f"device={args.device}", *base]
    cuda = args.device.startswith("cuda")
    flash = importlib.util.find_spec("flash_attn") is not None
    return [
        (
            "DeepSeek-OCR-2",
            [
                f"model={'deepseek_ocr2_tiny' if tiny else 'deepseek_ocr2'}",
                f"device={args.device}",
                "model.impl=fast",
                "max_new_tokens=8",
                "profiling.repeats=2",
            ],
            "",
        ),
        ("batch of 2", [*own, "batch_size=2"], ""),
        ("profiling.warmup=0", [*own, "profiling.warmup=0"], ""),
        (
            "model.attn_impl=flash_attn",
            [*own, "model.attn_impl=flash_attn"] if cuda and flash else None,
            "flash_attn does not import here" if not flash else "not on CUDA",
        ),
        (
            "a second GPU (cuda:1)",
            [f"model={args.model}", "device=cuda:1", *base]
            if cuda and torch.cuda.device_count() > 1
            else None,
            "one GPU here" if cuda else "not on CUDA",
        ),
    ]


def other_configs(args: argparse.Namespace, check: Check, runs_dir: Path) -> list[str]:
    """Each configuration the main runs do not reach, one short fast job each; a failed one is
    recorded and the others still run. With warmup=0 the first timed run is also the first run:
    its TTFT against the warm job's shows any setup (graph capture, tuning) left in it."""
    rows, problems, cut = [], [], []
    for name, overrides, why_not in extra_configs(args):
        if overrides is None:
            check.unchecked.append(f"{name}: {why_not}")
            continue
        job = runs_dir / ("extra_" + "".join(c if c.isalnum() else "_" for c in name))
        try:
            record = harness_job(check, job, overrides, args.job_timeout)
        except OutOfBudget as exc:
            cut.append(f"{name}: {exc}")
            continue
        except StepFailed as exc:
            problems.append(f"- {name}: {exc}")
            continue
        row = job_row(name, "fast", record)
        rows.append(
            {"configuration": name, **{k: row[k] for k in ("dtype", "TTFT ms", "TPOT ms", "coverage %")}}
        )
    lines = table(rows, ("configuration", "dtype", "TTFT ms", "TPOT ms", "coverage %")) if rows else []
    warm = runs_dir / f"{args.modes[0]}_fast" / "run.json"
    cold = next((r for r in rows if r["configuration"] == "profiling.warmup=0"), None)
    if cold and warm.is_file() and args.max_new_tokens >= 1:
        warm_ttft = json.loads(warm.read_text())["timing"]["summary"]["ttft_ms"]["median"]
        lines += [
            "",
            f"- TTFT without warm-up / with: {cold['TTFT ms'] / warm_ttft:.2f}x ({cold['TTFT ms']:,.1f} / {warm_ttft:,.1f} ms)",
        ]
    lines += ["", *ncu_check(args, check, runs_dir, problems, cut)]
    return jobs_outcome(problems, cut, lines)


def ncu_check(
    args: argparse.Namespace, check: Check, runs_dir: Path, problems: list[str], cut: list[str]
) -> list[str]:
    """runners/ncu_stages.sh on decode's first kernels, where ncu is on PATH."""
    if shutil.which("ncu") is None:
        check.unchecked.append("Nsight Compute (runners/ncu_stages.sh): ncu is not on PATH")
        return []
    out = runs_dir / "ncu"
    env = child_env({"NCU_OUT": str(out), "PYTHON": sys.executable, "STAGES": "decode", "LAUNCH_COUNT": "5"})
    timeout, bound = check.job_timeout(args.job_timeout)
    cmd = [
        "bash",
        Path(__file__).with_name("ncu_stages.sh"),
        f"model={args.model}",
        f"mode={args.modes[0]}",
        "model.impl=fast",
        f"device={args.device}",
        "max_new_tokens=4",
    ]
    try:
        run(cmd, timeout, env=env, budget_bound=bound)
    except OutOfBudget as exc:
        cut.append(f"ncu: {exc}")
        return []
    except StepFailed as exc:
        problems.append(f"- ncu: {exc}")
        return []
    csv = out / "decode.csv"
    kernels = max(len(csv.read_text().splitlines()) - 2, 0) if csv.is_file() else 0  # header and units rows
    return [f"- ncu: {kernels} decode kernels profiled into `{out}`"]


def parity(args: argparse.Namespace) -> list[str]:
    """The tiny model, reference vs fast forced onto the GPU's paths, same dummy weights: vision
    output, prefill logits and greedy tokens. Off CUDA, the paths meta stands in with."""
    device = torch.device(args.device)
    if device.type == "cuda":  # load, tuning, capture and the checks on the GPU named, not the current one
        with torch.cuda.device(device):
            return _parity(device)
    return _parity(device)


def _parity(device: torch.device) -> list[str]:
    from llm_perf_opt.config import load
    from llm_perf_opt.models.deepseek_ocr.fast.paths import choose_paths
    from llm_perf_opt.models.interface import SessionOptions
    from llm_perf_opt.models.tokenizer import DEFAULT_PROMPT
    from llm_perf_opt.runners.dsocr_session import DeepSeekOCRSession

    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        paths = choose_paths(torch.device("meta") if device.type == "cpu" else device, dtype)
        forced = [f"model.paths.{k}={v}" for k, v in paths.as_dict().items() if k != "bias_tile_elements"]
        out = {}
        for impl in IMPLS:
            cfg = load(["model=deepseek_ocr_tiny", "mode=gundam", f"model.impl={impl}", *forced]).model
            session = DeepSeekOCRSession(cfg, SessionOptions(device, dtype))
            request = session.prepare(None, DEFAULT_PROMPT)
            session.load()
            session.fit_dummy_weights(request)
            with torch.inference_mode():
                embeds = session.encode_images(request)
                logits = session.model.prefill(
                    request.input_ids, embeds, session.model.new_cache(request.prompt_tokens)
                )
            out[impl] = (embeds.float(), logits.float(), session.generate(request, 8).tokens)
        (re, rl, rt), (fe, fl, ft) = out["reference"], out["fast"]
        rows.append(
            {
                "dtype": str(dtype).removeprefix("torch."),
                "fast paths": ", ".join(
                    f"{k.split('=')[0].removeprefix('model.paths.')} {k.split('=')[1]}" for k in forced
                ),
                "vision max abs diff": (fe - re).abs().max().item(),
                "vision max abs": re.abs().max().item(),
                "prefill logits max abs diff": (fl - rl).abs().max().item(),
                "greedy tokens equal": ft == rt,
            }
        )
    lines = table(rows, list(rows[0]))
    if not all(r["greedy tokens equal"] for r in rows if r["dtype"] == "float32"):
        raise StepFailed("\n".join(lines + ["", "fp32 greedy tokens differ"]))
    return lines


def nsys_capture(args: argparse.Namespace, check: Check, out_dir: Path) -> list[str]:
    if shutil.which("nsys") is None:
        check.unchecked.append("Nsight Systems capture and `report --from-nsys`: nsys is not on PATH")
        return ["nsys is not on PATH: no Nsight Systems capture, `report --from-nsys` not checked"]
    capture = out_dir / "nsys"
    env = child_env({"NSYS_OUT": str(capture), "PYTHON": sys.executable})
    script = Path(__file__).with_name("nsys_profile.sh")
    timeout, bound = check.job_timeout(args.job_timeout)
    run(
        [
            "bash",
            script,
            f"model={args.model}",
            f"mode={args.modes[0]}",
            "model.impl=fast",
            f"device={args.device}",
            "max_new_tokens=8",
        ],
        timeout,
        env=env,
        budget_bound=bound,
    )
    report = capture / "report.md"
    return [
        f"capture and report in `{capture}` (the timed runs only; their timings taken under nsys with "
        "per-node CUDA-graph tracing: compare them only with other nsys captures)",
        "",
        *report.read_text().splitlines()[:40],
    ]


def compare(args: argparse.Namespace, check: Check, runs_dir: Path) -> list[str]:
    mode = args.modes[0]
    base, fast = runs_dir / f"{mode}_reference", runs_dir / f"{mode}_fast"
    if not (base / "run.json").is_file() or not (fast / "run.json").is_file():
        raise StepFailed(f"the {mode} jobs did not both finish")
    cmd = [sys.executable, "-m", "llm_perf_opt.compare", str(base), str(fast), "--force"]
    timeout, bound = check.job_timeout(60)
    proc = run(cmd, timeout, budget_bound=bound, check=False)
    # compare exits non-zero on a regression; the table is the finding either way.
    return [
        f"`python -m llm_perf_opt.compare {base} {fast} --force` (exit {proc.returncode})",
        "",
        proc.stdout,
    ]


def code_version() -> str:
    """The short commit of the tree, or why there is none (no git, not a checkout)."""
    if shutil.which("git") is None:
        return "unknown commit (no git here)"
    proc = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=SRC.parent
    )
    return proc.stdout.strip() or "unknown commit (not a git checkout)"


# -- the command ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, help="the markdown file (default outputs/gpu-check/<time>/gpu-check.md)"
    )
    parser.add_argument("--budget", type=float, default=480, help="seconds for the whole check (default 480)")
    parser.add_argument(
        "--device", default="cuda", help="cuda (default), cuda:N, or cpu to try the steps here"
    )
    parser.add_argument("--model", default="deepseek_ocr", help="the model of the harness runs")
    parser.add_argument("--modes", nargs="+", default=["base", "gundam"], help="modes of the harness runs")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens per harness run")
    parser.add_argument("--job-timeout", type=float, default=150, help="seconds per harness job at most")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from llm_perf_opt.config import load
    from llm_perf_opt.errors import UserError

    try:  # the models resolve (a bare copy has no package metadata), before anything runs
        load([f"model={args.model}"])
    except UserError as exc:
        print(f"error: gpu-check --model {args.model}: {exc}", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            f"gpu-check: no CUDA GPU here (torch {torch.__version__}, CUDA {torch.version.cuda}): nothing to check"
        )
        return 0
    out = args.out or Path("outputs/gpu-check") / time.strftime("%Y-%m-%d_%H-%M-%S") / "gpu-check.md"
    out_dir = out.parent
    runs_dir = out_dir / "runs"
    check = Check(out, args.budget)
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    check.add(
        f"# gpu-check · {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · {name}",
        "",
        f"- torch {torch.__version__}, CUDA {torch.version.cuda}; code at {code_version()}",
        f"- model {args.model}, modes {', '.join(args.modes)}, {args.max_new_tokens} new tokens, "
        f"budget {args.budget:.0f} s",
        "",
    )
    check.step("calibrate and the datasheet match", lambda: calibrate(args, check), needs_s=20)
    check.step("harness runs: both implementations", lambda: harness_runs(args, check, runs_dir), needs_s=60)
    check.step("CUDA-graph decode attributed to decode", lambda: graph_attribution(args, check, runs_dir))
    check.step("parity of the GPU formulations (tiny model)", lambda: parity(args), needs_s=10)
    check.step("other configurations", lambda: other_configs(args, check, runs_dir), needs_s=30)
    check.step("Nsight Systems capture", lambda: nsys_capture(args, check, out_dir), needs_s=60)
    check.step("compare: reference → fast", lambda: compare(args, check, runs_dir), needs_s=5)
    check.add("## not checked here", "", *(f"- {item}" for item in check.unchecked or ["nothing"]), "")
    verdict = check.verdict()
    check.add("## verdict", "", verdict)
    print(f"gpu-check: {verdict}\n{out}")
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
