"""For tests that call DeepSeek-OCR's model directly, outside its session: the model on the meta
device as the session builds it there, and a stage's analytic cost without what the session's
stage ranges add around the model's own calls."""

from __future__ import annotations

import torch

from llm_perf_opt.analytic.families import Cost
from llm_perf_opt.models.deepseek_ocr import weights
from llm_perf_opt.models.interface import even_split

#: Families of work the session does inside a stage range around the model's calls: the pixels
#: cast to the model's dtype (SAM), the image layout (projector), the greedy pick (prefill, decode).
SESSION_FAMILIES = ("pixel_cast", "layout", "greedy_pick")


def forward_total(parts: dict[str, Cost]) -> Cost:
    """The cost of a stage's (or a step's) families, less SESSION_FAMILIES."""
    return sum((cost for family, cost in parts.items() if family not in SESSION_FAMILIES), Cost())


def meta_model(arch, impl: str = "reference", dtype: torch.dtype = torch.bfloat16):
    """The model on the meta device, its routed layers feeding their experts an even split."""
    model = weights.build_model(arch, torch.device("meta"), dtype, "sdpa", impl=impl)
    for moe in model.moe_layers().values():
        moe.count_tokens = even_split
    return model
