"""What DeepSeek-OCR's implementations spend op time on that a reader of a trace would not guess,
for the report's verdicts (ModelSession.op_notes)."""

from __future__ import annotations

from llm_perf_opt.models.interface import OpNote

from .stages import SAM

#: The reference's SAM attention adds its decomposed relative-position terms into a
#: [B, heads, N, N] bias for every call (N = 4,096 in the global blocks of base mode) and reshapes
#: it; the fast implementation writes the bias a tile at a time without the copy (CPU) or folds it
#: into the query-key product (GPU).
REFERENCE = (
    OpNote(
        SAM,
        ("aten::copy_", "aten::add"),
        "mostly the relative-position bias the reference materialises per attention call "
        "([heads, N, N], written by add and copied by its reshape), plus the windows' partition copies "
        "and the residual adds; model.impl=fast writes the bias in tiles without the copy",
    ),
)


def op_notes(impl: str) -> tuple[OpNote, ...]:
    """The notes for `model.impl` (the fast paths leave no op that needs explaining)."""
    return REFERENCE if impl == "reference" else ()
