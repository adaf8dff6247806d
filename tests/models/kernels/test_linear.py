"""The CPU products of kernels.linear against fp64 and F.linear."""

from __future__ import annotations

import pytest
import torch

from llm_perf_opt.models.kernels.linear import CHUNK_ROWS, FEW_ROWS, matvec, rows_product


def close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """Equal up to `rel` of the expected values' largest magnitude."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * float(expected.abs().max()))


@pytest.mark.parametrize("rows", [1, 3, FEW_ROWS + 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matvec_is_the_linear_product(rows, dtype):
    gen = torch.Generator().manual_seed(11)
    weight = torch.randn(1792, 1280, generator=gen).to(dtype)
    x = torch.randn(1, rows, 1280, generator=gen).to(dtype)
    expected = x.double() @ weight.double().T  # [1, rows, 1792], in fp64 for reference
    got = matvec(weight, x)
    assert got.shape == (1, rows, 1792) and got.dtype == dtype and got.is_contiguous()
    # The split and weight-major products (fp32, up to FEW_ROWS rows) sum in another order:
    # fp32 rounding only.
    close(got.double(), expected, rel=1e-6 if dtype == torch.float32 else 1e-2)
    if rows > FEW_ROWS or dtype != torch.float32:
        assert torch.equal(got, torch.nn.functional.linear(x, weight))  # F.linear itself
    assert torch.equal(matvec(weight, x, split=False, rows=False), torch.nn.functional.linear(x, weight))


def test_rows_product_covers_every_weight_block():
    """Weights of 2.5 blocks of CHUNK_ROWS rows: the last, partial block is written too."""
    gen = torch.Generator().manual_seed(12)
    n = 2 * CHUNK_ROWS + CHUNK_ROWS // 2
    weight, x = torch.randn(n, 96, generator=gen), torch.randn(5, 96, generator=gen)
    got = rows_product(weight, x)
    assert got.shape == (5, n) and got.is_contiguous()
    close(got.double(), x.double() @ weight.double().T, rel=1e-6)
