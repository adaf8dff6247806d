"""Which device a run uses: `device=auto|cpu|cuda|cuda:N`, checked against what is here."""

from __future__ import annotations

import torch

from llm_perf_opt.errors import UserError


def resolve_device(name: str) -> torch.device:
    """auto = the current CUDA device if there is one, else the CPU."""
    if name == "auto":
        return (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device={name!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"device={name!r} is not supported (use cpu or cuda)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device={name} requested but no CUDA GPU is available here")
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise UserError(f"device={name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        device = torch.device("cuda", index)
    return device
