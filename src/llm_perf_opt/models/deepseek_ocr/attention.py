"""Scaled dot-product attention behind one call, with the three backends a user can pick.

All backends take q, k, v as [B, H, S, D]. `flash_attn` only handles the LM and CLIP
(no additive bias), so SAM's biased attention always goes through SDPA or eager.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import warnings

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "eager", "flash_attn")


#: flash_attn's kernels: Ampere (SM 8.0) or newer, half precision only.
FLASH_MIN_CAPABILITY = (8, 0)
FLASH_DTYPES = (torch.float16, torch.bfloat16)


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The backend that will actually run: flash_attn falls back to sdpa, with one warning line
    saying why, where it cannot run (off CUDA, a dtype other than fp16/bf16, a GPU below SM 8.0,
    or a package that does not import, e.g. a wheel built for another torch) rather than fail
    inside CLIP's first call."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "flash_attn":
        why = _flash_unavailable(device, dtype)
        if why:
            warnings.warn(f"flash_attn cannot run here ({why}); using sdpa", stacklevel=2)
            return "sdpa"
    return name


def _flash_unavailable(device: torch.device, dtype: torch.dtype | None) -> str | None:
    if device.type != "cuda":
        return f"device {device.type}, not CUDA"
    if dtype is not None and dtype not in FLASH_DTYPES:
        return f"dtype {str(dtype).removeprefix('torch.')}; it runs float16 and bfloat16 only"
    capability = torch.cuda.get_device_capability(device)
    if capability < FLASH_MIN_CAPABILITY:
        return f"GPU of compute capability {capability[0]}.{capability[1]}; it needs 8.0 or newer"
    if importlib.util.find_spec("flash_attn") is None:
        return "the flash_attn package is not installed"
    try:
        importlib.import_module("flash_attn")
    except (ImportError, OSError) as exc:  # built against another torch or CUDA: undefined symbols
        return f"flash_attn does not import: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    return None


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    backend: str = "sdpa",
    causal: bool = False,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ / √D + bias [+ causal mask]) v  →  [B, H, Sq, D]."""
    if backend == "flash_attn" and bias is None:
        from flash_attn import flash_attn_func  # optional dependency, CUDA only

        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
        return out.transpose(1, 2)
    if backend == "eager":
        return _eager(q, k, v, causal=causal, bias=bias)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=causal)


def _eager(q, k, v, *, causal: bool, bias: torch.Tensor | None) -> torch.Tensor:
    # Softmax in fp32, as the reference implementation's eager path does.
    scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias.float()
    if causal:
        sq, sk = scores.shape[-2:]
        # Query i sits at absolute position sk - sq + i and may see keys up to it.
        allowed = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1).to(v.dtype) @ v
