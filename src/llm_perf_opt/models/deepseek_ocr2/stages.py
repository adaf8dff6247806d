"""DeepSeek-OCR-2's stages, in the order one request runs them. Defined here once."""

from __future__ import annotations

from llm_perf_opt.models.interface import Stage

PREPROCESS = "preprocess"
SAM = "sam"
VISION = "vision"  # the Qwen2-style encoder over SAM features and the learnt queries
PROJECTOR = "projector"
PREFILL = "prefill"
DECODE = "decode"

STAGES: tuple[Stage, ...] = (
    Stage(PREPROCESS),
    Stage(SAM),
    Stage(VISION),
    Stage(PROJECTOR),
    Stage(PREFILL),
    Stage(DECODE, per_step=True),
)

#: Stages that run on the model (preprocessing is host work, no FLOPs counted).
MODEL_STAGES: tuple[str, ...] = (SAM, VISION, PROJECTOR, PREFILL, DECODE)

#: Parameter group of prefill and decode, which share every language-model weight.
LANGUAGE_MODEL = "language_model"
