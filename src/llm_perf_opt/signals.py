"""SIGTERM handled as Ctrl-C: SLURM, CI runners and `timeout` stop a run with SIGTERM, whose
default action ends the process at once, with no run.json. Raised as a KeyboardInterrupt, it
unwinds the job like Ctrl-C does: open artifacts are dropped (atomic writes), the subprocess
running at the time is killed by `subprocess.run`, and the job records itself as interrupted."""

from __future__ import annotations

import signal
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
