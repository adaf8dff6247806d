"""Opening a checkpoint's safetensors file, where a damaged one is the user's to fix."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from llm_perf_opt.errors import UserError


@contextmanager
def open_safetensors(file: Path) -> Iterator[Any]:
    """`safe_open` on CPU; a file safetensors cannot read (truncated, garbage, zero bytes: its
    header is checked against the file's length) is one UserError naming the file."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            yield f
    except SafetensorError as exc:
        reason = " ".join(str(exc).split())
        raise UserError(f"checkpoint: {file} is not a readable safetensors file: {reason}") from None
