"""SIGTERM handled as Ctrl-C: SLURM, CI runners and `timeout` stop a run with SIGTERM, whose
default action ends the process at once, with no run.json. Raised as a KeyboardInterrupt, it
unwinds the job like Ctrl-C does: open artifacts are dropped (atomic writes), the subprocess
running at the time is killed by `subprocess.run`, and the job records itself as interrupted."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager


class Terminated(KeyboardInterrupt):
    """The process was sent SIGTERM."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises Terminated (in the main thread, where Python runs
    handlers); the previous handler is back after it, so a caller in-process keeps its own."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_code(exc: KeyboardInterrupt) -> int:
    """The shell's code for a process ended by the signal: 128 + its number."""
    return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)


def cause(exc: KeyboardInterrupt) -> str:
    return "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted by the user"


def quiet_start() -> None:
    """Until :func:`started`, SIGINT and SIGTERM end the process with one line: the imports before
    `main()` (torch's among them) take seconds, and a KeyboardInterrupt there is a traceback."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _exit_while_starting)


def _exit_while_starting(signum: int, frame: object) -> None:
    text = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted by the user"
    print(f"{text}: no job started", file=sys.stderr)
    raise SystemExit(128 + signum)


def started() -> None:
    """Back to Python's own handlers: Ctrl-C raises KeyboardInterrupt, SIGTERM ends the process
    (`main()` turns it into a KeyboardInterrupt while it runs)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
