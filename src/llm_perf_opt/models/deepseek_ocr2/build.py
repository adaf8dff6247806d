"""DeepSeek-OCR-2 built from transformers' own classes: on the meta device (shapes only), then
materialised with seeded dummy weights (or filled from a checkpoint, checkpoint.py)."""

from __future__ import annotations

import math
from dataclasses import asdict

import torch
from torch import nn
from transformers import DeepseekOcr2Config, DeepseekOcr2ForConditionalGeneration
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from llm_perf_opt.errors import UserError

from .config import Ocr2Arch

# Random values are drawn once into a pool and every tensor copies a scaled slice of it:
# drawing billions of normals one by one takes tens of seconds on 2 cores.
POOL_SIZE = 1 << 25


def hf_config(arch: Ocr2Arch, attn_impl: str) -> DeepseekOcr2Config:
    """transformers' config for this architecture."""
    text = asdict(arch.text)
    dense = text.pop("first_k_dense_replace")
    text["mlp_layer_types"] = ["dense" if i < dense else "sparse" for i in range(arch.text.num_hidden_layers)]
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": text.pop("rope_theta")}
    encoder = asdict(arch.encoder)
    encoder["rope_parameters"] = {"rope_type": "default", "rope_theta": encoder.pop("rope_theta")}
    return config_from_parts(
        {"sam_config": asdict(arch.sam), "encoder_config": encoder}, text, arch.image_token_id, attn_impl
    )


def config_from_parts(vision: dict, text: dict, image_token_id: int, attn_impl: str) -> DeepseekOcr2Config:
    """DeepseekOcr2Config from plain dicts; its validation errors as one UserError line."""
    try:
        config = DeepseekOcr2Config(vision_config=vision, text_config=text, image_token_id=image_token_id)
    except (TypeError, ValueError) as exc:
        raise UserError(
            f"model: transformers rejects the architecture: {' '.join(str(exc).split())}"
        ) from None
    config._attn_implementation = attn_impl
    return config


def meta_model(config: DeepseekOcr2Config) -> DeepseekOcr2ForConditionalGeneration:
    """The whole model on the meta device: every shape, no storage, nothing computed."""
    with torch.device("meta"):
        model = DeepseekOcr2ForConditionalGeneration(config)
    return model.eval().requires_grad_(False)


def materialise(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Uninitialised storage on `device` in `dtype`, except what transformers keeps in fp32
    (the MoE gates, `_keep_in_fp32_modules_strict`); buffers (rotary tables) computed again."""
    keep_fp32 = {name for name, _ in model.named_parameters() if name.endswith("mlp.gate.weight")}
    model = model.to(dtype=dtype)
    for name, param in model.named_parameters():
        if name in keep_fp32:
            param.data = param.data.to(torch.float32)
    model = model.to_empty(device=device)
    reset_buffers(model)
    return model


def reset_buffers(model: nn.Module) -> None:
    """Recompute the non-persistent rotary tables, which `to_empty` leaves uninitialised."""
    for module in model.modules():
        if hasattr(module, "inv_freq") and hasattr(module, "rope_type"):
            init = (
                module.compute_default_rope_parameters
                if module.rope_type == "default"
                else ROPE_INIT_FUNCTIONS[module.rope_type]
            )
            inv_freq, scaling = init(module.config)
            module.inv_freq = inv_freq.to(module.inv_freq.device)
            module.original_inv_freq = inv_freq.clone().to(module.inv_freq.device)
            module.attention_scaling = scaling


def dummy_model(
    config: DeepseekOcr2Config, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> nn.Module:
    """Seeded random weights with the scale of a trained network (finite, small).

    Norm weights 1, biases 0, matrices and expert stacks N(0, 1/fan_in) so activations stay
    O(1), MoE gates N(0, 1/hidden), embeddings, position tables, learnt queries and the view
    separator N(0, 0.02^2), SAM's relative-position tables 0 (as transformers initialises them).
    """
    model = materialise(meta_model(config), device, dtype)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pool = torch.randn(POOL_SIZE, generator=gen).clamp_(-4, 4).to(device=device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            leaf = name.rpartition(".")[2]
            if "norm" in name and leaf == "weight":
                param.fill_(1.0)
            elif leaf == "bias" or leaf in ("rel_pos_h", "rel_pos_w"):
                param.zero_()
            elif param.dim() >= 2 and not _is_table(name):
                _fill(
                    param,
                    pool,
                    gen,
                    std=1.0 / math.sqrt(param.shape[-1] if param.dim() == 3 else param[0].numel()),
                )
            else:
                _fill(param, pool, gen, std=0.02)
    return model


def _is_table(name: str) -> bool:
    """Embedding-like parameters: looked up, not multiplied as a matrix."""
    return any(part in name for part in ("embed_tokens", "pos_embed", "query_768", "query_1024"))


def _fill(param: torch.Tensor, pool: torch.Tensor, gen: torch.Generator, std: float) -> None:
    """param <- std * (a slice of the pool from a random offset, wrapping around). In the pool's
    dtype the product is written in one pass over the parameter; in another dtype the slice is
    cast first and scaled in that dtype (two roundings, as these weights have always been made)."""
    flat = param.view(-1)
    offset = int(torch.randint(0, POOL_SIZE, (1,), generator=gen))
    done = 0
    while done < flat.numel():
        n = min(flat.numel() - done, POOL_SIZE - offset)
        if flat.dtype == pool.dtype:
            torch.mul(pool[offset : offset + n], std, out=flat[done : done + n])
        else:
            flat[done : done + n].copy_(pool[offset : offset + n]).mul_(std)
        done += n
        offset = 0
