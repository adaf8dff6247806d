"""DeepSeek-OCR's analytic model behind the harness: the stage costs and the memory footprint of
one run, from the shapes of its request. Named by `DeepSeekOCRModelConfig.analytic`."""

from __future__ import annotations

from llm_perf_opt.models.deepseek_ocr.analytic import checks
from llm_perf_opt.models.deepseek_ocr.analytic.costs import stage_costs
from llm_perf_opt.models.deepseek_ocr.analytic.footprint import footprint
from llm_perf_opt.models.deepseek_ocr.config import DeepSeekOCRModelConfig
from llm_perf_opt.models.deepseek_ocr.routing import RoutingRecord
from llm_perf_opt.models.deepseek_ocr.session import BatchRequest, Execution, Request
from llm_perf_opt.models.deepseek_ocr.stages import DECODE, PREFILL
from llm_perf_opt.models.interface import CheckCase, Footprint, RoutingCounts, StageCosts


class DeepSeekOCRAnalytic:
    """The analytic side of DeepSeek-OCR for the harness (named by DeepSeekOCRModelConfig.analytic)."""

    def __init__(self, cfg: DeepSeekOCRModelConfig):
        self.cfg = cfg

    def stage_model(
        self,
        request: Request | BatchRequest,
        decode_steps: int,
        dtype: str,
        routing: RoutingCounts | None,
        execution: Execution | None = None,
    ) -> StageCosts:
        """The FLOPs and bytes of exactly this run: its tiles, prompt, decode steps, observed
        routing, and the paths the implementation took (`execution`; None: the reference's)."""
        return stage_costs(
            self.cfg.arch,
            self.cfg.mode,
            **_shape(request),
            decode_steps=decode_steps,
            dtype=dtype,
            routing=None if routing is None else routing_record(routing),
            paths=None if execution is None else execution.paths,
            cache_len=None if execution is None else execution.cache_len,
        ).costs()

    def footprint(
        self,
        request: Request | BatchRequest,
        max_new_tokens: int,
        dtype: str,
        execution: Execution | None = None,
    ) -> Footprint:
        """Weights, KV cache and largest transients of the run: of the reference before the model
        is built (the memory check; the fast paths need no more), of the paths that ran after."""
        model = stage_costs(
            self.cfg.arch, self.cfg.mode, **_shape(request), decode_steps=max_new_tokens - 1, dtype=dtype
        )
        return footprint(self.cfg.arch, model.workload, None if execution is None else execution.paths)

    def check_cases(self, impl: str) -> list[CheckCase]:
        """The runs `analytic.validate` counts: every mode, gundam at four tile grids; for the
        fast implementation, under each path set that runs on meta (checks.py)."""
        return checks.check_cases(impl)

    def reference_checks(self) -> list[tuple[str, float, float]]:
        """Published figures of the released model its formulas reproduce (checks.py)."""
        return checks.reference_checks()


def _shape(request: Request | BatchRequest) -> dict:
    """stage_costs' arguments for the request's pages: the first page's grid and text tokens
    (one prompt for all), and every page's grid for a batch."""
    pages = request.pages
    grids = [page.views.grid for page in pages] if len(pages) > 1 else None
    return {"grid": pages[0].views.grid, "text_tokens": pages[0].text_tokens, "grids": grids}


def routing_record(counts: RoutingCounts) -> RoutingRecord:
    """The recorder's per-stage counts as DeepSeek-OCR's prefill / decode record."""
    prefill = counts.get(PREFILL, [])
    if len(prefill) != 1:
        raise ValueError(f"routing: expected one recorded prefill, got {len(prefill)}")
    return RoutingRecord(prefill=prefill[0], decode=counts.get(DECODE, []))
