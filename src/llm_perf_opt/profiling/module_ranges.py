"""Nested `stage/family` ranges around module families, through forward hooks.

The model stays free of profiling code: with `profiling.granularity=module` the session
attaches these hooks, and each family module's forward runs inside a range named after the
stage that is running and the family (`prefill/moe`, `sam/attn`, `decode/lm_head`).
"""

from __future__ import annotations

from collections.abc import Callable

from torch.utils.hooks import RemovableHandle

from llm_perf_opt.models.deepseek_ocr.clip import ClipAttention, ClipMLP
from llm_perf_opt.models.deepseek_ocr.decoder import MoE, RMSNorm, SwiGLU
from llm_perf_opt.models.deepseek_ocr.decoder import Attention as LMAttention
from llm_perf_opt.models.deepseek_ocr.model import DeepSeekOCR
from llm_perf_opt.models.deepseek_ocr.sam import PatchEmbed, SamAttention, SamMLP

from .ranges import module_range


def module_families(model: DeepSeekOCR) -> dict[str, str]:
    """Qualified name → family of every module that gets its own nested range.

    Only the outermost module of a family is tagged (an MoE's experts run inside `moe`).
    A dense LM layer's SwiGLU is its `mlp`; the SwiGLUs inside an MoE (`experts.N`,
    `shared_experts`) are not tagged.
    """
    families: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, (SamAttention, ClipAttention, LMAttention)):
            families[name] = "attn"
        elif isinstance(module, (SamMLP, ClipMLP)) or (isinstance(module, SwiGLU) and name.endswith(".mlp")):
            families[name] = "mlp"
        elif isinstance(module, MoE):
            families[name] = "moe"
        elif isinstance(module, PatchEmbed):
            families[name] = "patch_embed"
        elif isinstance(module, RMSNorm):
            families[name] = "norm"
    for name in ("model.sam_model.neck", "model.sam_model.net_2", "model.sam_model.net_3"):
        families[name] = "neck"
    families["model.embed_tokens"] = "embed"
    families["model.projector"] = "linear"
    families["lm_head"] = "lm_head"
    return families


def attach_module_ranges(model: DeepSeekOCR, current_stage: Callable[[], str]) -> list[RemovableHandle]:
    """Hook every family module; returns the handles so the caller can detach them."""
    modules = dict(model.named_modules())
    handles: list[RemovableHandle] = []
    for name, family in module_families(model).items():
        open_ranges = []

        def enter(_module, _args, family=family, open_ranges=open_ranges):
            rng = module_range(current_stage(), family)
            rng.__enter__()
            open_ranges.append(rng)

        def leave(_module, _args, _out, open_ranges=open_ranges):
            open_ranges.pop().__exit__(None, None, None)

        handles.append(modules[name].register_forward_pre_hook(enter))
        handles.append(modules[name].register_forward_hook(leave, always_call=True))
    return handles
