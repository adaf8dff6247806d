"""DeepSeek-OCR's module families: which modules get their own nested `stage/family` range."""

from __future__ import annotations

from .clip import ClipAttention, ClipMLP
from .decoder import Attention as LMAttention
from .decoder import MoE, RMSNorm, SwiGLU
from .model import DeepSeekOCR
from .sam import PatchEmbed, SamAttention, SamMLP


def module_families(model: DeepSeekOCR) -> dict[str, str]:
    """Qualified name -> family of every module that gets its own nested range.

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
