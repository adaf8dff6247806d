"""DeepSeek-OCR: vision (SAM → CLIP → projector → layout), prefill and decode as explicit calls.

    feats  = model.project(sam_out := model.sam(pixels), model.clip(sam_out))   per view size
    embeds = model.layout(global_feats, tile_feats, grid)                        [N_img, 1280]
    cache  = model.new_cache(max_len, batch, pads)
    logits = model.prefill(input_ids, embeds, cache)                             [B, vocab] fp32
    logits = model.decode_step(next_tokens, cache)                               [B, vocab] fp32

A batch of prompts is left-padded to the longest (`pads` per sequence; see decoder.KVCache).

Module names follow the official checkpoint keys (`model.sam_model…`, `model.layers…`, `lm_head`).
The model knows nothing about profiling; the session wraps these calls in stage ranges.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .clip import ClipEncoder
from .config import DeepSeekOCRConfig
from .decoder import DecoderLayer, KVCache, RMSNorm, rope_cos_sin
from .projector import Projector, layout_image_embeds
from .sam import SamEncoder


class DeepSeekOCRModel(nn.Module):
    """Everything but lm_head, under the `model.` prefix of the checkpoint."""

    def __init__(self, cfg: DeepSeekOCRConfig, backend: str):
        super().__init__()
        lm = cfg.lm
        self.sam_model = SamEncoder(cfg.sam)
        self.vision_model = ClipEncoder(cfg.clip, backend)
        self.projector = Projector(cfg.projector_in, lm.hidden_size)
        self.image_newline = nn.Parameter(torch.zeros(lm.hidden_size))
        self.view_seperator = nn.Parameter(torch.zeros(lm.hidden_size))  # sic, checkpoint key
        self.embed_tokens = nn.Embedding(lm.vocab_size, lm.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(lm, i, backend) for i in range(lm.num_hidden_layers))
        self.norm = RMSNorm(lm.hidden_size, lm.rms_norm_eps)


class DeepSeekOCR(nn.Module):
    def __init__(self, cfg: DeepSeekOCRConfig, backend: str = "sdpa"):
        super().__init__()
        self.cfg = cfg
        self.model = DeepSeekOCRModel(cfg, backend)
        self.lm_head = nn.Linear(cfg.lm.hidden_size, cfg.lm.vocab_size, bias=False)

    # -- vision ----------------------------------------------------------------------------
    def sam(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B,3,S,S] → [B,1024,S/64,S/64]"""
        return self.model.sam_model(pixels.to(self.dtype))

    def clip(self, sam_out: torch.Tensor) -> torch.Tensor:
        """[B,1024,h,w] → [B,1+h·w,1024]"""
        return self.model.vision_model(sam_out)

    def project(self, sam_out: torch.Tensor, clip_out: torch.Tensor) -> torch.Tensor:
        """→ [B, h·w, hidden]"""
        return self.model.projector(sam_out, clip_out)

    def layout(self, global_feats: torch.Tensor, tile_feats: torch.Tensor | None, grid: tuple[int, int]):
        """→ [N_img, hidden] in the LM's order: tiles, global view, separator."""
        return layout_image_embeds(
            global_feats, tile_feats, grid, self.model.image_newline, self.model.view_seperator
        )

    # -- language model ----------------------------------------------------------------------
    def new_cache(self, max_len: int, batch: int = 1, pads: Sequence[int] | None = None) -> KVCache:
        return KVCache(self.cfg.lm, max_len, batch, self.dtype, self.device, pads)

    def prefill(self, input_ids: torch.Tensor, image_embeds: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """input_ids [B,S] with N_img `<image>` ids in all; image_embeds [N_img, hidden] in the
        order of those ids (sequence by sequence) → last logits [B, vocab]."""
        # The caller guarantees one `<image>` id per image embedding (checked on the host when
        # the request is prepared), so no device→host sync is needed here.
        x = self.model.embed_tokens(input_ids)  # [B,S,d]
        is_image = input_ids == self.cfg.image_token_id
        x = x.masked_scatter(is_image[..., None], image_embeds.to(x.dtype))
        return self._forward(x, cache)

    def decode_step(self, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """tokens [B,1] → logits [B, vocab] of the next position."""
        return self._forward(self.model.embed_tokens(token), cache)

    def _forward(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        start, s = cache.length, x.shape[1]
        if start + s > cache.max_len:
            raise ValueError(f"KV cache of {cache.max_len} positions cannot hold {start + s}")
        if s > 1 and start > 0:
            # The square causal mask of a multi-token forward assumes an empty cache.
            raise ValueError("multi-token forwards (chunked prefill) on a non-empty cache are not supported")
        cos, sin = rope_cos_sin(
            cache.positions(start, s), self.cfg.lm.head_dim, self.cfg.lm.rope_theta, x.dtype
        )
        if cos.dim() == 3:  # per-sequence positions [B,S,D] → [B,1,S,D], over the heads
            cos, sin = cos[:, None], sin[:, None]
        cache.bias = cache.attention_bias(start, s, x.dtype)
        for layer in self.model.layers:
            x = layer(x, (cos, sin), cache)
        cache.length += s
        # Only the last position's logits are needed to pick the next token.
        return self.lm_head(self.model.norm(x[:, -1])).float()

    # -- helpers ----------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def moe_layers(self) -> dict[int, nn.Module]:
        """Index → MoE module of every MoE layer."""
        return {i: layer.mlp for i, layer in enumerate(self.model.layers) if self.cfg.lm.is_moe_layer(i)}
