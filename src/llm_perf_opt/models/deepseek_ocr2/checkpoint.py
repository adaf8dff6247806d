"""A local DeepSeek-OCR-2 checkpoint: config.json read as data, weights from safetensors only.

Nothing in the folder is executed: a `modeling_*.py` beside the weights and an `auto_map` in
config.json (remote code) are ignored, only the JSON fields below are read. Pickled weights
(`pytorch_model.bin`, ...) are refused, since unpickling can run code.

Tensor names are transformers' own (`model.vision_tower...`, `model.language_model...`,
`lm_head.weight`). Routed experts are accepted in transformers' fused layout
(`mlp.experts.gate_up_proj` [E, 2I, h], `mlp.experts.down_proj` [E, h, I]) or one module per
expert (`mlp.experts.<e>.{gate,up,down}_proj.weight`), which are stacked on load.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import DeepseekOcr2Config

from llm_perf_opt.errors import UserError
from llm_perf_opt.models.safetensors_file import open_safetensors

from .build import config_from_parts, materialise, meta_model

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
#: The config.json fields read; everything else (auto_map, architectures, ...) is ignored.
READ_FIELDS = ("model_type", "vision_config", "text_config", "image_token_id")
MODEL_TYPE = "deepseek_ocr2"
_PER_EXPERT = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate|up|down)_proj\.weight$")


def checkpoint_config(folder: Path, attn_impl: str) -> DeepseekOcr2Config:
    """transformers' config from the folder's config.json, read as JSON (no code runs)."""
    if not folder.is_dir():
        raise UserError(f"checkpoint: {folder} is not a folder")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"checkpoint: {folder} has no {CONFIG_FILE}")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"checkpoint: cannot read {path}: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict):
        raise UserError(f"checkpoint: {path} is not a JSON object")
    if raw.get("model_type", MODEL_TYPE) != MODEL_TYPE:
        raise UserError(f"checkpoint: {path} has model_type {raw['model_type']!r}, not {MODEL_TYPE!r}")
    vision, text = raw.get("vision_config"), raw.get("text_config")
    if not isinstance(vision, dict) or not isinstance(text, dict):
        raise UserError(f"checkpoint: {path} needs vision_config and text_config objects")
    image_token_id = raw.get("image_token_id", DeepseekOcr2Config().image_token_id)
    return config_from_parts(_data(vision), _data(text), image_token_id, attn_impl)


def _data(node: dict) -> dict:
    """A sub-config's fields without the bookkeeping keys transformers writes and re-derives."""
    return {
        k: _data(v) if isinstance(v, dict) and k.endswith("_config") else v
        for k, v in node.items()
        if k not in ("transformers_version", "architectures", "auto_map")
    }


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of the folder (sharded through the index, or all of them)."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"checkpoint: cannot read {index}: {' '.join(str(exc).split())}") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise UserError(f"checkpoint: {index} names missing shard(s) {', '.join(missing)}")
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UserError(
            f"checkpoint: {folder} has only pickled weights ({', '.join(pickles)}); "
            "only safetensors are loaded (unpickling can run code)"
        )
    raise UserError(f"checkpoint: {folder} has no *.safetensors weights")


def load_checkpoint(folder: Path, device: torch.device, dtype: torch.dtype, attn_impl: str) -> nn.Module:
    """The model from the folder: built on meta from config.json, filled by tensor name.
    Missing, unexpected and wrongly shaped tensors are reported together in one UserError."""
    config = checkpoint_config(folder, attn_impl)
    files = weight_files(folder)
    model = materialise(meta_model(config), device, dtype)
    params = dict(model.named_parameters())
    seen: set[str] = set()
    unexpected, wrong = [], []
    stacked: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for file in files:
        with open_safetensors(file) as f:
            for key in f.keys():
                per_expert = _PER_EXPERT.match(key)
                if per_expert and key not in params:
                    slot = stacked.setdefault(per_expert["prefix"], {}).setdefault(int(per_expert["e"]), {})
                    slot[per_expert["proj"]] = f.get_tensor(key)
                    continue
                if key not in params:
                    unexpected.append(key)
                    continue
                tensor = f.get_tensor(key)
                if tuple(tensor.shape) != tuple(params[key].shape):
                    wrong.append(f"{key} {list(tensor.shape)} != {list(params[key].shape)}")
                    continue
                params[key].data.copy_(tensor)
                seen.add(key)
    for prefix, experts in stacked.items():
        seen |= _stack_experts(prefix, experts, params, wrong)
    missing = sorted(set(params) - seen)
    problems = [
        (f"{len(missing)} missing", missing),
        (f"{len(unexpected)} unexpected", unexpected),
        (f"{len(wrong)} wrongly shaped", wrong),
    ]
    found = [f"{label} (e.g. {', '.join(names[:3])})" for label, names in problems if names]
    if found:
        raise UserError(f"checkpoint: {folder} does not fit the model of its config.json: {'; '.join(found)}")
    return model


def _stack_experts(
    prefix: str, experts: dict[int, dict[str, torch.Tensor]], params: dict, wrong: list[str]
) -> set[str]:
    """Per-expert gate/up/down weights into the fused [E, 2I, h] and [E, h, I] parameters."""
    gate_up, down = params.get(f"{prefix}.gate_up_proj"), params.get(f"{prefix}.down_proj")
    if gate_up is None or down is None:
        wrong.append(f"{prefix}.<e>.*_proj: the model has no experts there")
        return set()
    if sorted(experts) != list(range(gate_up.shape[0])) or any(len(p) != 3 for p in experts.values()):
        wrong.append(f"{prefix}: expected gate, up and down weights of experts 0..{gate_up.shape[0] - 1}")
        return set()
    for e, parts in experts.items():
        fused = torch.cat([parts["gate"], parts["up"]], dim=0)
        if fused.shape != gate_up.shape[1:] or parts["down"].shape != down.shape[1:]:
            wrong.append(f"{prefix}.{e}: {list(fused.shape)}, {list(parts['down'].shape)}")
            return set()
        gate_up.data[e].copy_(fused)
        down.data[e].copy_(parts["down"])
    return {f"{prefix}.gate_up_proj", f"{prefix}.down_proj"}


def save_checkpoint(model: nn.Module, folder: Path) -> None:
    """config.json and model.safetensors in the layout `load_checkpoint` reads (reduced test models)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(model.config.to_json_string())
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(folder / WEIGHTS_FILE)
    )
