"""Which formulation each fast module runs, in one place.

`choose_paths` is the guess by device type and dtype, used where nothing was measured (the
meta device of the analytic checks, a module run on its own). A session measures the
candidates on its device instead (`tuning.tune_paths`) and fixes the winners with
`FastDeepSeekOCR.use_paths`; it records them in run.json, and the analytic model costs the
bytes of exactly these paths (`models.deepseek_ocr.analytic.costs.stage_costs(paths=...)`). The paths differ
in what they move, not in what they compute: the analytic FLOPs are the reference's whichever
path runs. Every choice includes the reference's own formulation ("reference" SAM attention,
"looped" experts, "eager" decode, "plain" linears), so a machine where no fast formulation
wins runs the reference's way.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from llm_perf_opt.models.kernels.blocked_attention import BIAS_TILE_ELEMENTS
from llm_perf_opt.models.kernels.linear import FEW_ROWS

SAM_ATTENTION = ("reference", "blocked", "folded")
MOE_PREFILL = ("grouped", "looped")
MOE_DECODE = ("grouped", "gathered", "one_by_one", "looped")
MOE_BATCH = ("one_by_one", "grouped", "looped")
DECODE = ("eager", "static", "graph")
LINEAR = ("split", "plain")
ROWS = ("weight_major", "plain")
#: Each choice's options, by FastPaths field.
OPTIONS = {
    "sam_attention": SAM_ATTENTION,
    "moe_prefill": MOE_PREFILL,
    "moe_decode": MOE_DECODE,
    "moe_batch": MOE_BATCH,
    "decode": DECODE,
    "linear": LINEAR,
    "rows": ROWS,
}

#: The folded head dimension is padded to a multiple of this (16-byte rows in bf16/fp16),
#: the alignment CUDA's fused attention kernels ask for.
FOLDED_ALIGN = 8


@dataclass(frozen=True)
class FastPaths:
    """How the fast implementation runs its parts that have more than one formulation.

    sam_attention: "reference" (the bias materialised, as released), "blocked" (query tiles of
        at most `bias_tile_elements` bias elements) or "folded" (the bias folded into a widened
        dot product; nothing N x N is written);
    moe_prefill, moe_decode, moe_batch: how the routed experts run for many tokens, for one,
        and for 2 to `kernels.linear.FEW_ROWS` (a decode step of a batch; see `routed_for`):
        "grouped" (two grouped GEMMs over expert-sorted rows), "gathered" (the chosen experts'
        weights copied, then batched matmuls; one token), "one_by_one" (ids read on the host,
        each chosen expert's two products on its rows; not in prefill) or "looped" (the
        reference's loop);
    decode: "eager" (the reference's decode step), "static" (positioned steps over a static
        cache, attending over all of it through a mask) or "graph" (those steps replayed from
        a CUDA graph, each returning a copy of the graph's logits);
    linear: the language model's one-token products on CPU in fp32: "split" (row blocks as one
        bmm, `kernels.linear.matvec`) or "plain" (F.linear, as the reference);
    rows: its products of 2 to `kernels.linear.FEW_ROWS` rows on CPU in fp32 (a decode step of
        a batch): "weight_major" (W · xᵀ over blocks of weight rows, `kernels.linear.rows_product`)
        or "plain".
    """

    sam_attention: str
    moe_prefill: str
    moe_decode: str
    decode: str
    linear: str = "split"
    rows: str = "weight_major"
    moe_batch: str = "one_by_one"
    bias_tile_elements: int = BIAS_TILE_ELEMENTS

    def __post_init__(self) -> None:
        for name, options in OPTIONS.items():
            if getattr(self, name) not in options:
                raise ValueError(
                    f"fast paths: {name} must be one of {', '.join(options)}, not {getattr(self, name)!r}"
                )
        if self.bias_tile_elements < 1:
            raise ValueError(
                f"fast paths: bias_tile_elements must be positive, not {self.bias_tile_elements}"
            )

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def routed_for(self, tokens: int) -> str:
        """How the routed experts run for a forward of `tokens` tokens: `moe_decode` for one,
        `moe_batch` for a few (up to FEW_ROWS, a decode step of a batch), `moe_prefill` beyond."""
        if tokens == 1:
            return self.moe_decode
        return self.moe_batch if tokens <= FEW_ROWS else self.moe_prefill

    def graphs_decode(self, batch: int) -> bool:
        """Whether decode steps of `batch` sequences replay a CUDA graph: the "graph" decode,
        unless its experts read ids or counts on the host ("looped", "one_by_one"), which no
        graph can hold."""
        return self.decode == "graph" and self.routed_for(batch) not in ("looped", "one_by_one")


@functools.cache
def _cuda_major(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0]


def grouped_mm_op() -> Callable[..., torch.Tensor] | None:
    """The grouped GEMM of this torch: `F.grouped_mm` (public from 2.10), else the private
    `torch._grouped_mm` that 2.8 and 2.9 have (the same arguments), else None."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


@functools.cache
def _grouped_mm_runs_on_cpu(dtype: torch.dtype) -> bool:
    """Whether this torch's grouped GEMM has a CPU kernel for `dtype` (torch._grouped_mm of some
    versions is CUDA-only): two groups of one row, tried once."""
    rows, weights = torch.ones(2, 8, dtype=dtype), torch.ones(2, 8, 8, dtype=dtype)  # 16-byte strides
    try:
        grouped_mm_op()(rows, weights, offs=torch.tensor([1, 2], dtype=torch.int32))
    except (RuntimeError, NotImplementedError):
        return False
    return True


def grouped_mm_without_sync(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `grouped_mm_op()` runs here without a device sync: on CPU (its loop over the
    groups reads the offsets in C++) where it has a CPU kernel, and in the CUDA kernel for bf16
    on SM 9.x/10.x; elsewhere on CUDA it copies the offsets to the host. Meta tensors follow the
    CUDA kernel's checks."""
    if grouped_mm_op() is None:
        return False
    if device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16, torch.float16) and _grouped_mm_runs_on_cpu(dtype)
    if device.type == "cuda":
        return dtype == torch.bfloat16 and _cuda_major(device) in (9, 10)
    return device.type == "meta" and dtype == torch.bfloat16


@functools.cache
def choose_paths(device: torch.device, dtype: torch.dtype) -> FastPaths:
    """The guess where nothing was measured, from one 2-core Zen 4 CPU and the CUDA kernels'
    constraints. CPU: blocked SAM attention (folding triples QK's multiply-adds, 1.6x slower
    there), grouped prefill experts, one-by-one experts for a decode step of one token or a
    batch (host reads cost no sync; CPU's grouped GEMM runs each group single-threaded), eager
    decode, split one-row and weight-major few-row products. Other CPUs differ (on an Intel
    Xeon with AMX the split products are 1.8x slower than F.linear), which is why sessions
    measure (`tuning.tune_paths`). CUDA (and meta, which stands in for it in tests): folded SAM
    attention, grouped experts where `grouped_mm_without_sync`, otherwise gathered for one
    token and looped for many, and decode replayed from a CUDA graph (static steps on meta,
    which has no graphs)."""
    if device.type == "cpu":
        return FastPaths("blocked", "grouped", "one_by_one", "eager", "split", "weight_major", "one_by_one")
    grouped = grouped_mm_without_sync(device, dtype)
    return FastPaths(
        "folded",
        "grouped" if grouped else "looped",
        "grouped" if grouped else "gathered",
        "graph" if device.type == "cuda" else "static",
        rows="plain",
        moe_batch="grouped" if grouped else "looped",
    )
