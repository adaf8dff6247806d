"""DeepSeek-OCR's stages, in the order one request runs them. Defined here once; everything
else (session, analytic model, tests) imports these names."""

from __future__ import annotations

from llm_perf_opt.models.interface import Stage

PREPROCESS = "preprocess"
SAM = "sam"
CLIP = "clip"
PROJECTOR = "projector"
PREFILL = "prefill"
DECODE = "decode"

STAGES: tuple[Stage, ...] = (
    Stage(PREPROCESS),
    Stage(SAM),
    Stage(CLIP),
    Stage(PROJECTOR),
    Stage(PREFILL),
    Stage(DECODE, per_step=True),
)
