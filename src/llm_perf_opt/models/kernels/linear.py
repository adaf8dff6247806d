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

A decode step of a batch multiplies a few rows (one per sequence) by each weight. There
`F.linear` ([M, K] · [N, K]ᵀ) is far from both roofs on the 2-core Zen 1 it was measured on
(fp32, 2 threads): lm_head [129,280 x 1,280] took 48 / 211 / 336 ms for 1 / 4 / 16 rows. The
same product computed weight-major, W · xᵀ, over blocks of CHUNK_ROWS weight rows, each
block's [C, M] result copied transposed into the [M, N] output, took 43 / 104 ms for 4 / 16
rows; the 1,280 x 1,280 projections 1.05 → 0.28 ms at 4 rows, 1.41 → 0.81 ms at 16
(`rows_product`). It costs an extra write and read of the output (the transposing copies), at
16 rows 2.5 % of the weight's bytes, and reads x once per block. `paths.FastPaths.rows` picks
it or F.linear, measured like the split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Row blocks of a split product (measured: 2 and 4 alike, on 2 threads).
SPLIT = 2
#: The most rows `rows_product` takes: a decode step of up to this many sequences.
FEW_ROWS = 64
#: Weight rows per weight-major product (measured on lm_head at 16 rows: 512-2,048 alike, 104 ms;
#: 16,160 rows 133 ms; all 129,280 at once 139 ms).
CHUNK_ROWS = 2048


def matvec(weight: torch.Tensor, x: torch.Tensor, split: bool = True, rows: bool = True) -> torch.Tensor:
    """x [..., K] · weightᵀ → [..., N] for weight [N, K], on CPU in fp32: with `split`, the split
    product where x holds a single row; with `rows`, `rows_product` where it holds 2 to FEW_ROWS
    rows (see the module docstring). F.linear otherwise."""
    n, k = weight.shape
    m = x.numel() // k
    if x.device.type != "cpu" or weight.dtype != torch.float32 or not weight.is_contiguous():
        return F.linear(x, weight)
    if m == 1 and split and not n % SPLIT:
        column = x.reshape(1, k).T.expand(SPLIT, k, 1)  # strides (0, 1, K): MKL's matrix-vector path
        return torch.bmm(weight.view(SPLIT, n // SPLIT, k), column).view(*x.shape[:-1], n)
    if 1 < m <= FEW_ROWS and rows:
        return rows_product(weight, x.reshape(m, k)).view(*x.shape[:-1], n)
    return F.linear(x, weight)


def rows_product(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x [M, K] · weightᵀ → [M, N], computed weight-major: W · xᵀ → [C, M] for each block of
    C = CHUNK_ROWS weight rows, each copied transposed into its columns of the output (a block's
    [C, M] is still in cache; one transposing copy of the whole [N, M] took 17 ms for lm_head at
    16 rows)."""
    columns = x.T  # [K, M]
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    for block, cols in zip(weight.split(CHUNK_ROWS), out.split(CHUNK_ROWS, dim=1)):
        cols.copy_(torch.mm(block, columns).T)
    return out


class FastLinear(nn.Linear):
    """A bias-free nn.Linear whose forward is `matvec` (on CPU in fp32: split one-row products
    while `split`, weight-major few-row products while `rows`); otherwise F.linear."""

    split = True  # FastPaths.linear == "split"; set by FastDeepSeekOCR.use_paths
    rows = True  # FastPaths.rows == "weight_major"; set by FastDeepSeekOCR.use_paths

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            return super().forward(x)
        return matvec(self.weight, x, self.split, self.rows)


def use_fast_linears(root: nn.Module) -> None:
    """Replace every bias-free nn.Linear under `root` by a FastLinear of the same shape, in
    place; call before the weights are written."""
    for name, child in root.named_children():
        if type(child) is nn.Linear and child.bias is None:
            setattr(root, name, FastLinear(child.in_features, child.out_features, bias=False))
        else:
            use_fast_linears(child)
