"""Running a command-line tool's main() in the test process."""

from __future__ import annotations

import sys


def call_main(monkeypatch, capsys, main, prog: str, *args: str) -> tuple[int, str, str]:
    """A command-line tool's main() in this process with this argv: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [prog, *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err
