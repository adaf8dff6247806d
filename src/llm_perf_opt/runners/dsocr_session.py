"""`llm_perf_opt.runners.dsocr_session.DeepSeekOCRSession`, the name users know: DeepSeek-OCR's
session lives with its model, in `llm_perf_opt.models.deepseek_ocr.session`."""

from llm_perf_opt.models.deepseek_ocr.session import DeepSeekOCRSession, Execution, Request

__all__ = ["DeepSeekOCRSession", "Execution", "Request"]
