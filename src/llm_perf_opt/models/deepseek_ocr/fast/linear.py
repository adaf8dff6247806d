"""One-token products with a weight matrix on CPU in fp32, at the memory bandwidth.

Decode multiplies one row by every weight matrix, so its speed is how fast the weights
stream from memory. `F.linear` of one fp32 row reaches MKL as a GEMM with M = 1; on the
2-core Zen 4 machine this was measured on it streamed the weights at 9-13 GB/s, with one
thread as with two. The same product as W·x, split into SPLIT blocks of rows and run as one
bmm ([SPLIT, N/SPLIT, K] x [SPLIT, K, 1]: SPLIT matrix-vector products that PyTorch spreads
over its threads) streamed 20-28 GB/s, where the machine reads about 29 GB/s. The sums run in
another order than F.linear's (differences in the last bits). In bf16 the split was no faster
than F.linear (which uses oneDNN there), so only fp32 takes it. On an Intel Xeon with AMX
the split was 1.8x slower than F.linear in fp32: `paths.FastPaths.linear` picks one, measured
on the machine at hand (`tuning`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Row blocks of a split product (measured: 2 and 4 alike, on 2 threads).
SPLIT = 2


def matvec(weight: torch.Tensor, x: torch.Tensor, split: bool = True) -> torch.Tensor:
    """x [..., K] · weightᵀ → [..., N] for weight [N, K]; with `split`, the split product where
    x holds a single row on CPU in fp32 (see the module docstring), F.linear otherwise."""
    n, k = weight.shape
    if (
        not split
        or x.device.type != "cpu"
        or weight.dtype != torch.float32
        or x.numel() != k
        or n % SPLIT
        or not weight.is_contiguous()
    ):
        return F.linear(x, weight)
    column = x.reshape(1, k).T.expand(SPLIT, k, 1)  # strides (0, 1, K): MKL's matrix-vector path
    return torch.bmm(weight.view(SPLIT, n // SPLIT, k), column).view(*x.shape[:-1], n)


class FastLinear(nn.Linear):
    """A bias-free nn.Linear whose one-token forward is `matvec` (CPU, fp32, while `split`);
    otherwise F.linear."""

    split = True  # FastPaths.linear == "split"; set by FastDeepSeekOCR.use_paths

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            return super().forward(x)
        return matvec(self.weight, x, self.split)


def use_fast_linears(root: nn.Module) -> None:
    """Replace every bias-free nn.Linear under `root` by a FastLinear of the same shape, in
    place; call before the weights are written."""
    for name, child in root.named_children():
        if type(child) is nn.Linear and child.bias is None:
            setattr(root, name, FastLinear(child.in_features, child.out_features, bias=False))
        else:
            use_fast_linears(child)
