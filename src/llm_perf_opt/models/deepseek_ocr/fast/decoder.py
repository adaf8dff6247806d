"""Positioned decode steps: the same kernels for every step, so a CUDA graph can replay them.

The reference decode step slices its KV cache with the host's `cache.length` (shapes change
every step) and attends over the filled prefix. A positioned step reads the token and the
position from device tensors instead: keys and values are written with `index_copy_` at the
position, and the query attends over the whole preallocated cache with a mask that hides the
positions after it. Every step then launches identical kernels on identical buffers, which is
what CUDA graph capture needs. It attends over `max_len` keys instead of `position + 1` (the
masked ones cost reads, not results); prefill and eager decode keep the reference's path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import LMConfig
from ..decoder import Attention, KVCache, apply_rope
from .graphs import DecodeGraph


class StaticKVCache(KVCache):
    """A KV cache that also holds the inputs of a positioned decode step (`token` [B, 1],
    `position` [1], on the device) and, on CUDA, the graph captured over its buffers.
    Zero-filled: masked keys and values still enter the attention kernel, and uninitialised
    memory could hold NaNs that a zero weight does not cancel.
    """

    def __init__(
        self,
        cfg: LMConfig,
        max_len: int,
        batch: int,
        dtype: torch.dtype,
        device: torch.device,
        pads: Sequence[int] | None = None,
    ):
        super().__init__(cfg, max_len, batch, dtype, device, pads)
        self.pad_key = tuple(pads or (0,) * batch)  # which requests may reuse it (and its graph)
        for buffer in self.keys + self.values:
            buffer.zero_()
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.graph: DecodeGraph | None = None  # the CUDA graph of a step over these buffers


@dataclass(frozen=True)
class PositionedStep:
    """What the attention layers of one positioned decode step share: the cache and which of
    its positions are visible (`visible` bool, position <= the step's position and not padding:
    [1, max_len], or [B, 1, 1, max_len] in a padded batch)."""

    cache: StaticKVCache
    visible: torch.Tensor

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, H, 1, D] at the step's position; return the layer's whole cache."""
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        keys.index_copy_(2, self.cache.position, k)
        values.index_copy_(2, self.cache.position, v)
        return keys, values


class FastAttention(Attention):
    """The LM attention; in a positioned step (cache is a `PositionedStep`) it writes at the
    device-side position and attends through a visibility mask (SDPA, whatever the backend).
    Otherwise it is the reference's forward."""

    def forward(self, x: torch.Tensor, rope, cache) -> torch.Tensor:
        if not isinstance(cache, PositionedStep):
            return super().forward(x, rope, cache)
        b, s, d = x.shape
        h, hd = self.cfg.num_attention_heads, self.cfg.head_dim
        q = self.q_proj(x).view(b, s, h, hd).transpose(1, 2)  # [B,H,1,D]
        k = self.k_proj(x).view(b, s, h, hd).transpose(1, 2)
        v = self.v_proj(x).view(b, s, h, hd).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        keys, values = cache.write(self.layer, k, v)  # [B,H,max_len,D]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=cache.visible)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, d))
