"""Preprocessing: a page through transformers' own image processor for DeepSeek-OCR-2 (its PIL
backend, constructed from its defaults and the mode; no hub access), and the prompt's ids.

No tokenizer is downloaded: the prompt is tokenised by DeepSeek-OCR's tokenizer module (the
text model and its vocabulary are DeepSeek-OCR's), which reads a checkpoint's tokenizer.json
when there is one and otherwise uses its deterministic stand-in (real special ids, realistic
text token counts, hashed text ids).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from transformers.models.deepseek_ocr2.image_processing_pil_deepseek_ocr2 import (
    DeepseekOcr2ImageProcessorPil,
    get_optimal_tiled_canvas,
)

from .config import Ocr2Mode, image_token_count


@dataclass(frozen=True)
class Views:
    """The processor's output for one page."""

    source_size: tuple[int, int]  # (width, height)
    pixel_values: torch.Tensor  # [1, 3, G, G], the global view
    pixel_values_local: torch.Tensor | None  # [tiles, 3, T, T]
    grid: tuple[int, int]  # (cols, rows) of tiles; (1, 1) without tiles
    image_tokens: int

    @property
    def tiles(self) -> int:
        return 0 if self.pixel_values_local is None else self.pixel_values_local.shape[0]


def processor(mode: Ocr2Mode) -> DeepseekOcr2ImageProcessorPil:
    """transformers' image processor with its defaults and this mode's sizes and tiling."""
    return DeepseekOcr2ImageProcessorPil(**mode.processor_kwargs())


def preprocess(image: Image.Image, mode: Ocr2Mode) -> Views:
    """Resize, pad, tile and normalise one page as the processor does."""
    out = processor(mode)(image, return_tensors="pt")
    tiles = int(out["num_local_patches"][0])
    local = out.get("pixel_values_local") if tiles else None
    grid = (1, 1)
    if tiles:
        grid = get_optimal_tiled_canvas(
            (image.height, image.width), (mode.image_size, mode.image_size), mode.min_tiles, mode.max_tiles
        )
    tokens = image_token_count(mode.global_size, mode.image_size, tiles)
    return Views((image.width, image.height), out["pixel_values"], local, tuple(grid), tokens)
