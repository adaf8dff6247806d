"""SAM ViT-B image encoder with its neck and the 16x token compressor.

pixels [B,3,S,S] → patches [B,G,G,768] (G = S/16) → 12 blocks (windowed 14×14, global at
2,5,8,11) → neck [B,256,G,G] → net_2 [B,512,G/2,G/2] → net_3 [B,1024,G/4,G/4].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attend
from .config import SamConfig


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a [B,C,H,W] tensor."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class PatchEmbed(nn.Module):
    def __init__(self, cfg: SamConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # [B,G,G,C], channels last


def resized_rel_pos(table: torch.Tensor, q_size: int, k_size: int) -> torch.Tensor:
    """Relative-position embeddings R[q, k, D] for every query/key offset along one axis.

    The table holds 2·max(q,k)−1 rows; at other input sizes it is linearly resized in fp32.
    """
    length = 2 * max(q_size, k_size) - 1
    if table.shape[0] != length:
        table = F.interpolate(table.float().T[None], size=length, mode="linear")[0].T.to(table.dtype)
    q_coords = torch.arange(q_size, device=table.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=table.device)[None, :] * max(q_size / k_size, 1.0)
    offsets = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return table[offsets.long()]


class SamAttention(nn.Module):
    """Multi-head attention over an H×W grid with a decomposed relative-position bias."""

    def __init__(self, cfg: SamConfig, grid: int):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * grid - 1, cfg.head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * grid - 1, cfg.head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, heads, N, D]
        bias = self._rel_pos_bias(q, h, w)  # [B, heads, N, N]
        out = attend(q, k, v, bias=bias)
        out = out.transpose(1, 2).reshape(b, h, w, c)
        return self.proj(out)

    def _rel_pos_bias(self, q: torch.Tensor, h: int, w: int) -> torch.Tensor:
        # Uses the unscaled q, as SAM does: bias[i, j] = q_i·R_h[hi, hj] + q_i·R_w[wi, wj].
        b, heads, n, d = q.shape
        r_q = q.reshape(b * heads, h, w, d)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, resized_rel_pos(self.rel_pos_h, h, h))
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, resized_rel_pos(self.rel_pos_w, w, w))
        bias = rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]  # [B·heads, h, w, h, w]
        return bias.reshape(b, heads, n, n)


class SamMLP(nn.Module):
    def __init__(self, cfg: SamConfig):
        super().__init__()
        self.lin1 = nn.Linear(cfg.width, cfg.mlp_ratio * cfg.width)
        self.lin2 = nn.Linear(cfg.mlp_ratio * cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.gelu(self.lin1(x)))


class SamBlock(nn.Module):
    def __init__(self, cfg: SamConfig, window: int):
        """window = 0 means global attention over the whole grid."""
        super().__init__()
        self.window = window
        grid = window or cfg.img_size // cfg.patch_size
        self.norm1 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.attn = SamAttention(cfg, grid)
        self.norm2 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.mlp = SamMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        if self.window:
            b, h, w, _ = y.shape
            windows, padded = window_partition(y, self.window)  # [B·nW, win, win, C]
            y = window_unpartition(self.attn(windows), self.window, padded, (h, w), b)
        else:
            y = self.attn(y)
        x = x + y
        return x + self.mlp(self.norm2(x))


def window_partition(x: torch.Tensor, win: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """[B,H,W,C] → [B·nH·nW, win, win, C], zero-padding H and W up to multiples of win.

    Padded tokens take part in attention as keys (no mask), as in the original SAM.
    """
    b, h, w, c = x.shape
    pad_h, pad_w = (-h) % win, (-w) % win
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // win, win, wp // win, win, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, win, win, c), (hp, wp)


def window_unpartition(
    windows: torch.Tensor, win: int, padded: tuple[int, int], size: tuple[int, int], batch: int
) -> torch.Tensor:
    """Inverse of window_partition, cropping the padding away."""
    hp, wp = padded
    h, w = size
    c = windows.shape[-1]
    x = windows.view(batch, hp // win, wp // win, win, win, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, hp, wp, c)[:, :h, :w].contiguous()


class SamEncoder(nn.Module):
    def __init__(self, cfg: SamConfig):
        super().__init__()
        grid = cfg.img_size // cfg.patch_size
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, cfg.width))
        self.blocks = nn.ModuleList(
            SamBlock(cfg, 0 if i in cfg.global_attn_indexes else cfg.window_size) for i in range(cfg.depth)
        )
        n = cfg.neck_channels
        self.neck = nn.Sequential(
            nn.Conv2d(cfg.width, n, 1, bias=False),
            LayerNorm2d(n),
            nn.Conv2d(n, n, 3, padding=1, bias=False),
            LayerNorm2d(n),
        )
        c2, c3 = cfg.downsample_channels
        self.net_2 = nn.Conv2d(n, c2, 3, stride=2, padding=1, bias=False)
        self.net_3 = nn.Conv2d(c2, c3, 3, stride=2, padding=1, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels)  # [B,G,G,768]
        x = x + self._pos_embed(x.shape[1])
        for block in self.blocks:
            x = block(x)
        x = self.neck(x.permute(0, 3, 1, 2))  # [B,256,G,G]
        return self.net_3(self.net_2(x))  # [B,1024,G/4,G/4]

    def _pos_embed(self, grid: int) -> torch.Tensor:
        pos = self.pos_embed
        if pos.shape[1] == grid:
            return pos
        # Antialiased bicubic, in fp32: the reference's exact call (it differs from plain bicubic).
        resized = F.interpolate(
            pos.permute(0, 3, 1, 2).float(),
            size=(grid, grid),
            mode="bicubic",
            antialias=True,
            align_corners=False,
        )
        return resized.to(pos.dtype).permute(0, 2, 3, 1)
