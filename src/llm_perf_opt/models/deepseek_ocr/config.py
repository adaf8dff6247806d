"""DeepSeek-OCR's typed config: the architecture (plain dataclasses) and the model's run options.

The full-size defaults are the official release's values. The official config.json does not describe the vision towers
(the remote code hard-codes them), so `from_official_json` reads only the language-model
fields from it. The dataclasses are also the Hydra schema of `conf/model/*.yaml`, which is
why they are not frozen: OmegaConf merges the YAML values into them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar

from llm_perf_opt.config import ModelConfig
from llm_perf_opt.errors import UserError

from .attention import BACKENDS
from .modes import ModeSpec


@dataclass
class SamConfig:
    """SAM ViT-B image encoder plus its neck and the two stride-2 "compressor" convs."""

    img_size: int = 1024  # pos-embed grid = img_size / patch_size
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: int = 4
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    neck_channels: int = 256
    downsample_channels: tuple[int, int] = (512, 1024)  # net_2, net_3 outputs

    def __post_init__(self) -> None:
        # YAML and JSON give lists; the architecture holds tuples.
        self.global_attn_indexes = tuple(self.global_attn_indexes)
        self.downsample_channels = tuple(self.downsample_channels)

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def out_channels(self) -> int:
        return self.downsample_channels[-1]


@dataclass
class ClipConfig:
    """CLIP-L transformer that reads SAM's features as its patch embeddings."""

    width: int = 1024
    layers: int = 24
    heads: int = 16
    ffn: int = 4096
    image_size: int = 224
    patch_size: int = 14

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid**2 + 1


@dataclass
class LMConfig:
    """DeepSeek-V2-style MoE decoder with plain multi-head attention (no MLA)."""

    vocab_size: int = 129280
    hidden_size: int = 1280
    intermediate_size: int = 6848
    moe_intermediate_size: int = 896
    num_hidden_layers: int = 12
    num_attention_heads: int = 10
    num_key_value_heads: int = 10
    n_routed_experts: int = 64
    n_shared_experts: int = 2
    num_experts_per_tok: int = 6
    first_k_dense_replace: int = 1
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 8192
    bos_token_id: int = 0
    eos_token_id: int = 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def shared_intermediate_size(self) -> int:
        return self.moe_intermediate_size * self.n_shared_experts

    def is_moe_layer(self, index: int) -> bool:
        return index >= self.first_k_dense_replace


@dataclass
class DeepSeekOCRConfig:
    sam: SamConfig = field(default_factory=SamConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    image_token_id: int = 128815

    @property
    def projector_in(self) -> int:
        """CLIP features (CLS dropped) concatenated with SAM features, per token."""
        return self.clip.width + self.sam.out_channels

    def __post_init__(self) -> None:
        for section in ("sam", "clip", "lm"):
            _check_field_types(section, getattr(self, section))
        if self.sam.out_channels != self.clip.width:
            raise UserError(
                f"model: SAM output channels ({self.sam.out_channels}) must equal the CLIP width "
                f"({self.clip.width}); SAM features are CLIP's patch embeddings"
            )
        if self.lm.hidden_size % self.lm.num_attention_heads:
            raise UserError("model: lm.hidden_size must be a multiple of lm.num_attention_heads")
        if self.lm.num_key_value_heads != self.lm.num_attention_heads:
            raise UserError("model: only plain multi-head attention is supported (kv heads = heads)")
        if self.lm.num_experts_per_tok > self.lm.n_routed_experts:
            raise UserError("model: lm.num_experts_per_tok exceeds lm.n_routed_experts")
        if self.sam.width % self.sam.heads or self.clip.width % self.clip.heads:
            raise UserError("model: vision widths must be multiples of their head counts")
        if max(self.sam.global_attn_indexes, default=-1) >= self.sam.depth:
            raise UserError("model: sam.global_attn_indexes must be below sam.depth")


# Integer fields that may be 0; every other integer is a size or count and must be positive.
_MAY_BE_ZERO = {"first_k_dense_replace", "n_shared_experts", "bos_token_id", "eos_token_id"}


def _check_field_types(section: str, part) -> None:
    """Wrong types or non-positive sizes (e.g. from a hand-edited config.json) as one UserError."""

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    for f in fields(part):
        value, default = getattr(part, f.name), f.default
        if isinstance(default, tuple):
            ok = isinstance(value, tuple) and all(is_int(v) and v >= 0 for v in value)
            kind = "a list of integers >= 0"
        elif isinstance(default, float):
            ok, kind = (is_int(value) or isinstance(value, float)) and value > 0, "a positive number"
        else:
            low = 0 if f.name in _MAY_BE_ZERO else 1
            ok, kind = is_int(value) and value >= low, f"an integer >= {low}"
        if not ok:
            raise UserError(f"model: {section}.{f.name} must be {kind}, got {value!r}")


VISION_KEY = "llm_perf_opt_vision"

#: Implementations of the same architecture and state dict: the faithful one and the fast one.
IMPLS = ("reference", "fast")


def _pick(cls, values: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in values.items() if k in names}


def from_official_json(path: Path) -> DeepSeekOCRConfig:
    """Read a checkpoint's config.json: the top-level language-model fields (as HF does)."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"checkpoint: cannot read {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise UserError(f"checkpoint: {path} is not a JSON object")
    if raw.get("use_mla"):
        raise UserError(f"checkpoint: {path} uses MLA attention, which DeepSeek-OCR v1 does not")
    # The official file has no usable vision block; checkpoints written by this project
    # (e.g. reduced test models) add one under VISION_KEY.
    vision = raw.get(VISION_KEY, {})
    if not isinstance(vision, dict) or not all(isinstance(vision.get(k, {}), dict) for k in ("sam", "clip")):
        raise UserError(f"checkpoint: {path}: {VISION_KEY} must be an object with sam and clip objects")
    try:
        return DeepSeekOCRConfig(
            sam=SamConfig(**_pick(SamConfig, vision.get("sam", {}))),
            clip=ClipConfig(**_pick(ClipConfig, vision.get("clip", {}))),
            lm=LMConfig(**_pick(LMConfig, raw)),
        )
    except TypeError as exc:
        raise UserError(f"checkpoint: bad field in {path}: {exc}") from None


def to_official_json(cfg: DeepSeekOCRConfig) -> dict:
    """The config.json fields this implementation reads, in the official naming."""
    lm = {f.name: getattr(cfg.lm, f.name) for f in fields(LMConfig)}
    return {
        "architectures": ["DeepseekOCRForCausalLM"],
        "model_type": "deepseek_vl_v2",
        "use_mla": False,
        "torch_dtype": "bfloat16",
        "projector_config": {"input_dim": cfg.projector_in, "n_embed": cfg.lm.hidden_size},
        **lm,
        "language_config": dict(lm),
        VISION_KEY: {"sam": asdict(cfg.sam), "clip": asdict(cfg.clip)},
    }


@dataclass
class PathsConfig:
    """`model.paths`: how model.impl=fast picks each formulation (fast/paths.py). "auto" times
    the candidates on this device at load and takes the fastest (fast/tuning.py, cached beside
    the calibration); an option name forces it, e.g. `model.paths.linear=plain`."""

    sam_attention: str = "auto"  # auto | reference | blocked | folded
    moe_prefill: str = "auto"  # auto | grouped | looped
    moe_decode: str = "auto"  # auto | one_by_one | grouped | gathered | looped
    moe_batch: str = "auto"  # auto | one_by_one | grouped | looped (a decode step of a batch)
    decode: str = "auto"  # auto | eager | static | graph (CUDA)
    linear: str = "auto"  # auto | split | plain
    rows: str = "auto"  # auto | weight_major | plain (few-row products: a decode step of a batch)
    refresh: bool = False  # measure again instead of reading the cache

    def __post_init__(self) -> None:
        from .fast.paths import OPTIONS  # here, not at the top: fast/ imports this module

        for name, options in OPTIONS.items():
            if getattr(self, name) not in ("auto", *options):
                raise UserError(
                    f"config: model.paths.{name}={getattr(self, name)!r} is not one of auto, {', '.join(options)}"
                )

    def forced(self) -> dict[str, str]:
        """The choices fixed by the user (FastPaths field → option)."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name != "refresh" and getattr(self, f.name) != "auto"
        }


@dataclass
class DeepSeekOCRModelConfig(ModelConfig):
    """The `model` node of a DeepSeek-OCR run (conf/model/deepseek_ocr*.yaml, conf/mode/*.yaml)."""

    session: ClassVar[str] = "llm_perf_opt.models.deepseek_ocr.session.DeepSeekOCRSession"
    analytic: ClassVar[str] = "llm_perf_opt.models.deepseek_ocr.analytic.model.DeepSeekOCRAnalytic"

    attn_impl: str = "sdpa"  # sdpa | eager | flash_attn
    impl: str = "reference"  # reference (faithful to the official code) | fast (models/deepseek_ocr/fast)
    paths: PathsConfig = field(default_factory=PathsConfig)  # model.impl=fast only
    arch: DeepSeekOCRConfig = field(default_factory=DeepSeekOCRConfig)
    # The mode a run gets without `mode=...`: conf/mode/base.yaml's values (a test keeps them equal).
    # The root config names no mode, so a model without resolution modes composes as it is.
    mode: ModeSpec = field(
        default_factory=lambda: ModeSpec(name="base", base_size=1024, image_size=1024, crop_mode=False)
    )

    def __post_init__(self) -> None:
        if self.attn_impl not in BACKENDS:
            raise UserError(f"config: model.attn_impl={self.attn_impl!r} is not one of {', '.join(BACKENDS)}")
        if self.impl not in IMPLS:
            raise UserError(f"config: model.impl={self.impl!r} is not one of {', '.join(IMPLS)}")
