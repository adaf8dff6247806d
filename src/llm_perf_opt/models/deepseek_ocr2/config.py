"""DeepSeek-OCR-2's typed options: the architecture, the resolution mode, the run options.

The architecture defaults are the released model's sizes (transformers' own config defaults
are generic DeepSeek-V2 / Qwen2 sizes, not this model's): a SAM ViT-B whose last conv gives
896 channels, a 24-layer Qwen2-0.5B-shaped vision encoder (896 wide, 14 heads, 2 KV heads)
reading SAM's features followed by learnt queries, a linear projector 896 -> 1280, and the
DeepSeek-3B-MoE text model of DeepSeek-OCR (12 layers, 64 routed experts, 6 per token, 2
shared, layer 0 dense). The dataclasses are also the Hydra schema of conf/model/deepseek_ocr2*.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from llm_perf_opt.config import ModelConfig
from llm_perf_opt.errors import UserError

#: Pixels per image token along one side: SAM's 16-pixel patches, then two stride-2 convs.
PIXELS_PER_TOKEN_SIDE = 64
#: The view sides the vision encoder has learnt queries for (transformers'
#: DeepseekOcr2VisionModel: query_768_resolution, 144 = 12x12, and query_1024_resolution, 256 = 16x16).
#: A view of another side would give a different number of SAM tokens than the queries
#: the model emits, and the processor's token count would not match the features.
QUERY_SIDES = (768, 1024)
ATTN_IMPLS = ("sdpa", "eager")
#: reference: transformers' code as it is; fast: the same model with the SAM forwards of fast.py.
IMPLS = ("reference", "fast")


@dataclass
class Ocr2Mode:
    """One resolution mode (conf/ocr2_mode/*.yaml, or the shared conf/mode/ group; both under
    `model.mode`). The fields are those of transformers' image processor: the global view's
    side (`size` when tiling, else `tile_size`), the tile side, whether the page is tiled
    (`crop_to_patches`) and the tile-count range."""

    name: str = "base"
    base_size: int = 1024  # side of the global view when crop_mode is true
    image_size: int = 1024  # side of a tile, and of the global view when crop_mode is false
    crop_mode: bool = False
    min_tiles: int = 2
    max_tiles: int = 6

    def __post_init__(self) -> None:
        sides = (self.global_size, self.image_size) if self.crop_mode else (self.global_size,)
        for side in sides:
            if side not in QUERY_SIDES:
                raise UserError(
                    f"mode {self.name}: DeepSeek-OCR-2 has learnt queries for views of "
                    f"{' or '.join(map(str, QUERY_SIDES))} pixels only, not {side} "
                    f"(base_size={self.base_size}, image_size={self.image_size}, crop_mode={self.crop_mode})"
                )
        if self.crop_mode and not (1 <= self.min_tiles <= self.max_tiles):
            raise UserError(f"mode {self.name}: need 1 <= min_tiles <= max_tiles")

    @property
    def global_size(self) -> int:
        return self.base_size if self.crop_mode else self.image_size

    def processor_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of DeepseekOcr2ImageProcessor(Pil) that this mode sets."""
        return {
            "size": {"height": self.base_size, "width": self.base_size},
            "tile_size": self.image_size,
            "crop_to_patches": self.crop_mode,
            "min_patches": self.min_tiles,
            "max_patches": self.max_tiles,
        }


def tokens_per_side(side: int) -> int:
    """q = ceil(side / 16 / 4): image tokens along one side of a view."""
    return -(-side // PIXELS_PER_TOKEN_SIDE)


def image_token_count(global_size: int, tile_size: int, tiles: int) -> int:
    """Image tokens of one page: N = q_g^2 + tiles * q_t^2 + 1 (the view separator); the same
    count as transformers' DeepseekOcr2Processor._get_num_image_tokens."""
    return tokens_per_side(global_size) ** 2 + tiles * tokens_per_side(tile_size) ** 2 + 1


@dataclass
class SamArch:
    """transformers' DeepseekOcr2SamVisionConfig fields this project sets."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    output_channels: int = 256
    window_size: int = 14
    global_attn_indexes: list[int] = field(default_factory=lambda: [2, 5, 8, 11])
    downsample_channels: list[int] = field(default_factory=lambda: [512, 896])
    image_size: int = 1024
    patch_size: int = 16
    mlp_ratio: float = 4.0


@dataclass
class EncoderArch:
    """transformers' DeepseekOcr2VisionEncoderConfig fields (Qwen2-0.5B shape)."""

    hidden_size: int = 896
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    intermediate_size: int = 4864
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 131072


@dataclass
class TextArch:
    """transformers' DeepseekOcr2TextConfig fields (DeepSeek-3B-MoE, plain multi-head attention)."""

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
    first_k_dense_replace: int = 1  # layers [0, k) dense, the rest MoE
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 8192
    bos_token_id: int = 0
    eos_token_id: int = 1


@dataclass
class Ocr2Arch:
    sam: SamArch = field(default_factory=SamArch)
    encoder: EncoderArch = field(default_factory=EncoderArch)
    text: TextArch = field(default_factory=TextArch)
    image_token_id: int = 128815

    def __post_init__(self) -> None:
        for section in ("sam", "encoder", "text"):
            _check_positive(section, getattr(self, section))
        if self.sam.downsample_channels[-1] != self.encoder.hidden_size:
            raise UserError(
                f"model: arch.sam.downsample_channels[-1] ({self.sam.downsample_channels[-1]}) must equal "
                f"arch.encoder.hidden_size ({self.encoder.hidden_size}): SAM's features are the encoder's inputs"
            )
        if self.text.num_experts_per_tok > self.text.n_routed_experts:
            raise UserError("model: arch.text.num_experts_per_tok exceeds arch.text.n_routed_experts")
        if self.text.first_k_dense_replace > self.text.num_hidden_layers:
            raise UserError("model: arch.text.first_k_dense_replace exceeds arch.text.num_hidden_layers")


_MAY_BE_ZERO = {"first_k_dense_replace", "n_shared_experts", "bos_token_id", "eos_token_id"}


def _check_positive(section: str, part: Any) -> None:
    """Sizes and counts must be positive integers, the float fields positive numbers."""
    for f in fields(part):
        value = getattr(part, f.name)
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        low = 0 if f.name in _MAY_BE_ZERO or f.name == "global_attn_indexes" else 1
        if not values and f.name != "global_attn_indexes":
            raise UserError(f"model: arch.{section}.{f.name} must not be empty")
        for v in values:
            if isinstance(f.default, float):  # eps, rope theta, ratios: any positive number
                ok, kind = isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, "positive"
            else:
                ok, kind = isinstance(v, int) and not isinstance(v, bool) and v >= low, f"integers >= {low}"
            if not ok:
                raise UserError(f"model: arch.{section}.{f.name} must be {kind}, got {value!r}")


@dataclass
class DeepSeekOCR2ModelConfig(ModelConfig):
    """The `model` node of a DeepSeek-OCR-2 run (conf/model/deepseek_ocr2*.yaml)."""

    session: ClassVar[str] = "llm_perf_opt.models.deepseek_ocr2.session.DeepSeekOCR2Session"
    analytic: ClassVar[str] = "llm_perf_opt.models.deepseek_ocr2.analytic.DeepSeekOCR2Analytic"

    attn_impl: str = "sdpa"  # sdpa | eager: transformers' attention implementation
    impl: str = "reference"  # reference (transformers' code) | fast (same weights, fast.py's SAM forwards)
    arch: Ocr2Arch = field(default_factory=Ocr2Arch)
    # The mode a run gets without `mode=` / `ocr2_mode=`: the global 1024 view, no tiles (as
    # conf/ocr2_mode/base.yaml and the shared conf/mode/base.yaml; a test keeps them equal).
    mode: Ocr2Mode = field(default_factory=Ocr2Mode)

    def __post_init__(self) -> None:
        if self.attn_impl not in ATTN_IMPLS:
            raise UserError(
                f"config: model.attn_impl={self.attn_impl!r} is not one of {', '.join(ATTN_IMPLS)}"
            )
        if self.impl not in IMPLS:
            raise UserError(f"config: model.impl={self.impl!r} is not one of {', '.join(IMPLS)}")
