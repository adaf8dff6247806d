"""The fast implementation of DeepSeek-OCR, beside the faithful one (`model.impl=fast`).

Fast modules subclass the reference modules (same parameters, same names) and override only
`forward`; `install_fast_modules` swaps them into a freshly built model, and
`FastDeepSeekOCR` is the reference model class with that done and CUDA-graph decode added.
Every checkpoint and dummy weight fits both implementations.
"""

from __future__ import annotations

from .model import FastDeepSeekOCR, install_fast_modules

__all__ = ["FastDeepSeekOCR", "install_fast_modules"]
