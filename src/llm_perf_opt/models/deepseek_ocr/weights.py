"""Weights: dummy initialisation, loading and saving checkpoints in the official layout.

Safetensors only: pickled weights are refused and nothing from a checkpoint folder is
ever executed (config.json is read as data).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from llm_perf_opt.errors import UserError
from llm_perf_opt.models.safetensors_file import open_safetensors

from .config import DeepSeekOCRConfig, from_official_json, to_official_json
from .decoder import RMSNorm, Router
from .fast import FastDeepSeekOCR
from .model import DeepSeekOCR
from .sam import LayerNorm2d

NORMS = (nn.LayerNorm, RMSNorm, LayerNorm2d)
MODEL_CLASSES = {"reference": DeepSeekOCR, "fast": FastDeepSeekOCR}

INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# Random values are drawn once into a pool and every tensor copies a scaled slice of it:
# drawing 3.3 B normals one by one takes ~40 s on 2 cores, copying takes ~2 s.
POOL_SIZE = 1 << 25


def build_model(
    cfg: DeepSeekOCRConfig, device: torch.device, dtype: torch.dtype, backend: str, impl: str = "reference"
) -> DeepSeekOCR:
    """The model with uninitialised storage on `device` (built on meta, so nothing is computed).

    `impl` picks the faithful implementation or the fast one (`fast/`): same module names and
    state dict, so every weight written afterwards fits both.
    """
    if impl not in MODEL_CLASSES:
        raise ValueError(f"unknown implementation {impl!r}; choose one of {', '.join(MODEL_CLASSES)}")
    with torch.device("meta"):
        model = MODEL_CLASSES[impl](cfg, backend)
    return model.to(dtype=dtype).to_empty(device=device).eval().requires_grad_(False)


def dummy_model(
    cfg: DeepSeekOCRConfig, device, dtype, backend: str = "sdpa", seed: int = 0, impl: str = "reference"
) -> DeepSeekOCR:
    """Seeded random weights with the scale of a trained network (finite, small, no denormals).

    Norms get weight 1 and bias 0, other biases 0, Linear/Conv weights N(0, 1/fan_in) so
    activations stay O(1), and embeddings / positional tables / special vectors N(0, 0.02²).
    Routing is balanced afterwards by `balance_router` on the input being profiled.
    """
    model = build_model(cfg, torch.device(device), dtype, backend, impl)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pool = torch.randn(POOL_SIZE, generator=gen).clamp_(-4, 4).to(device=device, dtype=dtype)
    for module in model.modules():
        for leaf, param in module.named_parameters(recurse=False):
            if isinstance(module, NORMS):
                param.fill_(1.0 if leaf == "weight" else 0.0)
            elif leaf == "bias":
                param.zero_()
            elif isinstance(module, (nn.Linear, nn.Conv2d, Router)):
                _fill_from_pool(param, pool, gen, std=1.0 / math.sqrt(param[0].numel()))
            else:
                _fill_from_pool(param, pool, gen, std=0.02)
    return model


def _fill_from_pool(param: torch.Tensor, pool: torch.Tensor, gen: torch.Generator, std: float) -> None:
    """param ← std · (a slice of the pool from a random offset, wrapping around)."""
    flat = param.view(-1)
    offset = int(torch.randint(0, POOL_SIZE, (1,), generator=gen))
    done = 0
    while done < flat.numel():
        n = min(flat.numel() - done, POOL_SIZE - offset)
        torch.mul(pool[offset : offset + n], std, out=flat[done : done + n])
        done += n
        offset = 0


# -- checkpoints ---------------------------------------------------------------------------------
def checkpoint_config(folder: Path) -> DeepSeekOCRConfig:
    """The architecture a checkpoint folder describes (its config.json, read as data)."""
    if not folder.is_dir():
        raise UserError(f"checkpoint: {folder} is not a folder")
    if not (folder / "config.json").is_file():
        raise UserError(f"checkpoint: {folder} has no config.json")
    return from_official_json(folder / "config.json")


def load_checkpoint(path, device, dtype, backend: str = "sdpa", impl: str = "reference") -> DeepSeekOCR:
    """Build the model from `path/config.json` and fill it from safetensors by parameter name.

    Accepts a single `*.safetensors` file or a sharded set with `model.safetensors.index.json`.
    Missing, unexpected and wrongly shaped tensors are reported together in one UserError.
    """
    folder = Path(path)
    cfg = checkpoint_config(folder)
    files = _weight_files(folder)
    model = build_model(cfg, torch.device(device), dtype, backend, impl)
    params = dict(model.named_parameters())
    seen, unexpected, wrong = set(), [], []
    for file in files:
        with open_safetensors(file) as f:
            for key in f.keys():
                if key not in params:
                    unexpected.append(key)
                    continue
                shape = tuple(f.get_slice(key).get_shape())
                if shape != tuple(params[key].shape):
                    wrong.append(f"{key} {list(shape)} != {list(params[key].shape)}")
                    continue
                params[key].copy_(f.get_tensor(key))
                seen.add(key)
    missing = sorted(set(params) - seen - {w.split(" ")[0] for w in wrong})
    _report_mismatch(folder, missing, unexpected, wrong)
    return model


def _weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"checkpoint: cannot read {index}: {exc}") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise UserError(f"checkpoint: {index.name} names missing shard(s): {', '.join(absent)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = [f.name for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise UserError(
            f"checkpoint: {folder} holds only pickled weights ({', '.join(sorted(pickles)[:3])}); "
            "pickles are refused, convert them to safetensors"
        )
    raise UserError(f"checkpoint: {folder} has no *.safetensors weights")


def _report_mismatch(folder: Path, missing: list[str], unexpected: list[str], wrong: list[str]) -> None:
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if keys:
            shown = "; ".join(keys[:3]) + (f"; … (+{len(keys) - 3})" if len(keys) > 3 else "")
            problems.append(f"{len(keys)} {label}: {shown}")
    if problems:
        raise UserError(f"checkpoint: {folder} does not fit the model: " + " | ".join(problems))


def save_checkpoint(model: DeepSeekOCR, path) -> Path:
    """Write config.json, one safetensors shard and its index, in the official file layout."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    shard = "model-00001-of-000001.safetensors"
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(folder / shard), metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": {k: shard for k in tensors}}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=1))
    (folder / "config.json").write_text(json.dumps(to_official_json(model.cfg), indent=1))
    return folder
