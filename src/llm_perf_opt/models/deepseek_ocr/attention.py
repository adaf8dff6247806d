"""Scaled dot-product attention behind one call, with the three backends a user can pick.

All backends take q, k, v as [B, H, S, D]. `flash_attn` only handles the LM and CLIP
(no additive bias), so SAM's biased attention always goes through SDPA or eager.
"""

from __future__ import annotations

import importlib.util
import math
import warnings

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "eager", "flash_attn")


def resolve_backend(name: str, device: torch.device) -> str:
    """The backend that will actually run: flash_attn falls back to sdpa off CUDA or
    when the package is missing, with one warning line."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "flash_attn":
        if device.type != "cuda" or importlib.util.find_spec("flash_attn") is None:
            warnings.warn("flash_attn is not available here; using sdpa", stacklevel=2)
            return "sdpa"
    return name


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
