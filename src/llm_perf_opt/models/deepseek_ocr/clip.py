"""CLIP-L transformer that takes SAM's output as its patch embeddings.

sam_out [B,1024,h,w] → tokens [B, 1+h·w, 1024] (CLS first) → pre-LN → 24 blocks → [B, 1+h·w, 1024].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attend
from .config import ClipConfig


class ClipEmbeddings(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.width))
        # In the checkpoint but never run: SAM's features replace the patch embedding.
        self.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.num_positions, cfg.width)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        b, n, c = patches.shape
        cls = self.class_embedding.to(patches.dtype).expand(b, 1, c)
        x = torch.cat([cls, patches], dim=1)  # [B, 1+n, C]
        return x + self._positions(n).to(x.dtype)

    def _positions(self, n: int) -> torch.Tensor:
        table = self.position_embedding.weight  # [1+g², C]
        grid = math.isqrt(table.shape[0] - 1)
        side = math.isqrt(n)
        if side == grid:
            return table
        patch = table[1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2).float()
        patch = F.interpolate(patch, size=(side, side), mode="bicubic", antialias=True, align_corners=False)
        patch = patch.permute(0, 2, 3, 1).reshape(side * side, -1).to(table.dtype)
        return torch.cat([table[:1], patch], dim=0)


class ClipAttention(nn.Module):
    def __init__(self, cfg: ClipConfig, backend: str):
        super().__init__()
        self.heads = cfg.heads
        self.backend = backend
        self.qkv_proj = nn.Linear(cfg.width, 3 * cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv_proj(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = attend(q, k, v, backend=self.backend)  # bidirectional, [B, heads, T, D]
        return self.out_proj(out.transpose(1, 2).reshape(b, t, c))


class ClipMLP(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.ffn)
        self.fc2 = nn.Linear(cfg.ffn, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick-GELU


class ClipBlock(nn.Module):
    def __init__(self, cfg: ClipConfig, backend: str):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=1e-5)
        self.self_attn = ClipAttention(cfg, backend)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=1e-5)
        self.mlp = ClipMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipTransformer(nn.Module):
    def __init__(self, cfg: ClipConfig, backend: str):
        super().__init__()
        self.layers = nn.ModuleList(ClipBlock(cfg, backend) for _ in range(cfg.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class ClipEncoder(nn.Module):
    def __init__(self, cfg: ClipConfig, backend: str = "sdpa"):
        super().__init__()
        self.embeddings = ClipEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=1e-5)  # key spelling as in the checkpoint
        self.transformer = ClipTransformer(cfg, backend)

    def forward(self, sam_out: torch.Tensor) -> torch.Tensor:
        patches = sam_out.flatten(2).transpose(1, 2)  # [B, h·w, 1024], row-major
        return self.transformer(self.pre_layrnorm(self.embeddings(patches)))
