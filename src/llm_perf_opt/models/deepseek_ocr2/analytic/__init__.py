"""DeepSeek-OCR-2's analytic side: costs counted on its meta-device model (counting.py), read by
the harness through DeepSeekOCR2Analytic (model.py)."""

from .model import DeepSeekOCR2Analytic

__all__ = ["DeepSeekOCR2Analytic"]
