"""DeepSeekOCR2Session: DeepSeek-OCR-2 (transformers' classes) behind the harness's ModelSession.

    session = DeepSeekOCR2Session(model_cfg, SessionOptions(torch.device("cpu"), torch.float32))
    request = session.prepare(None, prompt)     # stage `preprocess`
    session.load()                              # dummy weights or a local checkpoint
    result = session.generate(request, 32)      # sam, vision, projector, prefill, decode x 31

transformers runs the vision side as one call (`get_image_features`); its stages are opened
from forward hooks on the modules that make them up, one range closing where the next opens
so that the glue between modules belongs to a stage too:

* `sam`: from the SAM encoder's pre-hook to its post-hook;
* `vision`: from there to the projector's pre-hook (SAM tokens + learnt queries through the
  Qwen2-style encoder, the query slice);
* `projector`: from there to the next view's SAM pre-hook, or to the end of the call (the
  linear projector, the layout of local views, global view and separator).

With tiles, the global view runs first and the tiles after as one batch, so each vision stage
has two calls. Prefill is one forward of the language model with the image features passed
in (`mm_encoder_outputs`), decode one forward per step with transformers' DynamicCache; both
greedy, batch 1, inside their own ranges.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from llm_perf_opt.errors import UserError
from llm_perf_opt.models.interface import ModelSession, Result, RoutedLayer, SessionOptions
from llm_perf_opt.models.pages import SAMPLE_PAGE, load_image
from llm_perf_opt.models.tokenizer import Tokenizer, build_input_ids, load_tokenizer
from llm_perf_opt.runners.ranges import stage_range

from .build import dummy_model, hf_config, meta_model
from .checkpoint import checkpoint_config, load_checkpoint
from .config import DeepSeekOCR2ModelConfig, Ocr2Mode
from .fast import DESCRIPTIONS, install_fast
from .meta import meta_runnable_model
from .stages import DECODE, LANGUAGE_MODEL, PREFILL, PREPROCESS, PROJECTOR, SAM, STAGES, VISION
from .views import Views, preprocess


@dataclass(frozen=True)
class Request:
    """One page + prompt, ready for the model (the output of `preprocess`)."""

    image_path: Path
    mode: Ocr2Mode
    prompt: str
    views: Views
    input_ids: torch.Tensor  # [1, S] on the model's device
    tokenizer: str

    @property
    def prompt_tokens(self) -> int:
        return self.input_ids.shape[1]

    @property
    def text_tokens(self) -> int:
        return self.prompt_tokens - self.views.image_tokens

    def describe(self) -> dict[str, Any]:
        views = self.views
        return {
            "image": {"path": str(self.image_path), "size": list(views.source_size)},
            "mode": dataclasses.asdict(self.mode),
            "tiles": {"cols": views.grid[0], "rows": views.grid[1], "count": views.tiles},
            "tokens": {"image": views.image_tokens, "text": self.text_tokens, "prompt": self.prompt_tokens},
            "tokenizer": self.tokenizer,
        }

    def summary(self) -> str:
        (width, height), (cols, rows) = self.views.source_size, self.views.grid
        tiles = f"{cols}×{rows} tiles" if self.views.tiles else "no tiles"
        return (
            f"mode {self.mode.name}, image {width}×{height} ({self.image_path.name}), {tiles}; "
            f"prompt {self.prompt_tokens} tokens ({self.views.image_tokens} image, {self.text_tokens} text; "
            f"tokenizer {self.tokenizer})"
        )


@dataclass(frozen=True)
class Execution:
    """How the model ran: transformers' attention and MoE-experts implementations, and with
    `impl` fast, the transformers classes whose forwards fast.py replaced."""

    attn_impl: str
    experts_impl: str
    cache: str = "DynamicCache"
    impl: str = "reference"
    replaced: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "impl": self.impl,
            "library": "transformers",
            "attn_impl": self.attn_impl,
            "experts_impl": self.experts_impl,
            "cache": self.cache,
            "notes": self.notes(),
        }

    def notes(self) -> list[str]:
        if not self.replaced:
            return []
        head = "model.impl=fast: these forwards replace transformers' (models/deepseek_ocr2/fast.py)"
        return [head, *(DESCRIPTIONS[kind] for kind in self.replaced)]

    def summary(self) -> str:
        fast = f", {len(self.replaced)} fast forwards (model.impl=fast)" if self.impl == "fast" else ""
        return (
            f"transformers' DeepseekOcr2ForConditionalGeneration: attention {self.attn_impl}, "
            f"routed experts {self.experts_impl}, KV cache {self.cache}{fast}"
        )


class _StageChain:
    """Opens one stage range at a time: switching to a stage closes the open one first."""

    def __init__(self) -> None:
        self._open: stage_range | None = None

    def switch(self, name: str) -> None:
        self.close()
        self._open = stage_range(name)
        self._open.__enter__()

    def close(self) -> None:
        rng, self._open = self._open, None
        if rng is not None:
            rng.__exit__(None, None, None)


@contextmanager
def vision_stage_hooks(model: nn.Module) -> Iterator[_StageChain]:
    """Forward hooks opening `sam`, `vision` and `projector` (module docstring) while inside."""
    inner = model.model
    chain = _StageChain()
    handles = [
        inner.vision_tower.sam_encoder.register_forward_pre_hook(lambda *_: chain.switch(SAM)),
        inner.vision_tower.sam_encoder.register_forward_hook(lambda *_: chain.switch(VISION)),
        inner.multi_modal_projector.register_forward_pre_hook(lambda *_: chain.switch(PROJECTOR)),
    ]
    try:
        yield chain
    finally:
        chain.close()
        for handle in handles:
            handle.remove()


class StagedRun:
    """One request on a model (real or meta), stage by stage; `cache` is the KV cache in use."""

    def __init__(self, model: nn.Module, is_eos: Callable[[torch.Tensor], bool] = lambda _: False) -> None:
        self.model = model
        self.is_eos = is_eos
        self.cache: DynamicCache | None = None

    def encode_images(self, views: Views) -> Any:
        """Stages `sam`, `vision`, `projector`: transformers' get_image_features, hooked."""
        with vision_stage_hooks(self.model):
            return self.model.model.get_image_features(
                views.pixel_values, views.pixel_values_local, [views.tiles], return_dict=True
            )

    def prefill(self, input_ids: torch.Tensor, image_features: Any) -> torch.Tensor:
        """Stage `prefill`: the prompt with the image features in place → the first token [1, 1]."""
        with stage_range(PREFILL):
            self.cache = DynamicCache(config=self.model.config.text_config)
            out = self.model(
                input_ids=input_ids,
                mm_encoder_outputs={"image": image_features},
                cache=self.cache,
                use_cache=True,
                logits_to_keep=1,
            )
            return out.logits[:, -1].argmax(-1, keepdim=True)

    def decode(self, token: torch.Tensor, steps: int) -> list[torch.Tensor]:
        """Stage `decode`, one range per step: greedy. Returns the tokens fed and produced."""
        tokens = [token]
        stop = self.is_eos(token)
        for _ in range(steps):
            if stop:
                break
            with stage_range(DECODE):
                out = self.model(input_ids=token, cache=self.cache, use_cache=True)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                stop = self.is_eos(token)
            tokens.append(token)
        return tokens

    def generate(self, request: Request, max_new_tokens: int) -> torch.Tensor:
        features = self.encode_images(request.views)
        token = self.prefill(request.input_ids, features)
        return torch.cat(self.decode(token, max_new_tokens - 1)).flatten()


class _RoutedGate:
    """A transformers MoE gate seen as the harness's RoutedLayer: a forward hook on the gate
    hands its top-k expert ids [tokens, k] to `on_route` when one is attached."""

    def __init__(self, gate: nn.Module) -> None:
        self.on_route: Callable[[torch.Tensor], None] | None = None
        self._experts = gate.num_experts
        gate.register_forward_hook(self._hook)

    @property
    def n_experts(self) -> int:
        return self._experts

    def _hook(self, _module: nn.Module, _args: Any, out: tuple[torch.Tensor, ...]) -> None:
        if self.on_route is not None:
            self.on_route(out[2])


class DeepSeekOCR2Session(ModelSession):
    stages = STAGES
    compute_groups = {"vision": (SAM, VISION, PROJECTOR), "prefill": (PREFILL,)}
    bandwidth_groups = {"decode": (DECODE,)}
    #: Parameter-name prefixes of each stage's weights; the longest match wins.
    stage_prefixes = {
        "model.vision_tower.sam_encoder": SAM,
        "model.vision_tower": VISION,  # the encoder and its learnt queries
        "model.multi_modal_projector": PROJECTOR,
        "model.view_separator": PROJECTOR,
        "model.language_model": LANGUAGE_MODEL,
        "lm_head": LANGUAGE_MODEL,
    }

    def __init__(self, cfg: DeepSeekOCR2ModelConfig, options: SessionOptions) -> None:
        super().__init__(cfg, options)
        self.checkpoint = None if cfg.dummy_weights else Path(cfg.weights).expanduser()
        # A checkpoint brings its own architecture (config.json, read as data).
        self.hf_config = (
            hf_config(cfg.arch, cfg.attn_impl)
            if self.checkpoint is None
            else checkpoint_config(self.checkpoint, cfg.attn_impl)
        )
        self.tokenizer: Tokenizer = load_tokenizer(self.checkpoint)
        self._model: nn.Module | None = None
        self._gates: list[_RoutedGate] = []
        self._run: StagedRun | None = None  # the request running now (its KV cache)
        self._replaced: tuple[str, ...] = ()  # with model.impl=fast, the forwards fast.py replaced

    # -- the interface -----------------------------------------------------------------------
    def prepare(self, image: str | Path | None, prompt: str) -> Request:
        """Stage `preprocess`: load, resize/pad/tile, normalise, tokenise, copy to the device."""
        path = Path(image) if image is not None else SAMPLE_PAGE
        device = self.options.device
        with stage_range(PREPROCESS):
            views = preprocess(load_image(path), self.cfg.mode)
            ids = build_input_ids(self.tokenizer, prompt, views.image_tokens)
            image_id = self.hf_config.image_token_id
            if ids.count(image_id) != views.image_tokens:
                raise UserError(
                    f"prompt: its text encodes extra {image_id} (<image>) ids; "
                    f"the page needs exactly {views.image_tokens}"
                )
            local = views.pixel_values_local
            views = dataclasses.replace(
                views,
                pixel_values=views.pixel_values.to(device, self.options.dtype, non_blocking=True),
                pixel_values_local=None
                if local is None
                else local.to(device, self.options.dtype, non_blocking=True),
            )
            input_ids = torch.tensor([ids], dtype=torch.long).to(device, non_blocking=True)
        return Request(path, self.cfg.mode, prompt, views, input_ids, self.tokenizer.name)

    def check(self, request: Request, max_new_tokens: int) -> None:
        window = self.hf_config.text_config.max_position_embeddings
        needed = request.prompt_tokens + max_new_tokens
        if needed > window:
            raise UserError(
                f"max_new_tokens={max_new_tokens}: the prompt has {request.prompt_tokens} tokens "
                f"({request.views.image_tokens} for the image), so {needed} positions exceed the context "
                f"window of {window}; use max_new_tokens <= {window - request.prompt_tokens}"
            )

    @property
    def meta(self) -> bool:
        return self.options.device.type == "meta"

    def load(self) -> None:
        """The model with dummy weights or the checkpoint's; on meta, shapes only, with the
        stand-ins that let transformers' code run there (meta.py). `model.impl=fast` then swaps
        in fast.py's forwards."""
        device, dtype = self.options.device, self.options.dtype
        if self.meta:
            self._model = meta_runnable_model(self.hf_config, dtype)
        elif self.checkpoint is None:
            self._model = dummy_model(self.hf_config, device, dtype, seed=self.options.seed)
        else:
            self._model = load_checkpoint(self.checkpoint, device, dtype, self.cfg.attn_impl)
        if self.cfg.impl == "fast":
            self._replaced = install_fast(self._model, device)
        self._gates = [
            _RoutedGate(m.gate) for m in self._model.modules() if type(m).__name__ == "DeepseekOcr2TextMoe"
        ]

    def generate(self, request: Request, max_new_tokens: int) -> Result:
        """Vision stages → prefill → up to max_new_tokens−1 decode steps, each in its range.
        inference_mode, or on meta no_grad: under inference_mode a dispatch mode sees composite
        ops whole, and a byte count would miss the copies inside them (analytic.byte_count)."""
        run = self.staged_run()
        with torch.no_grad() if self.meta else torch.inference_mode():
            return Result(run.generate(request, max_new_tokens))

    def staged_run(self) -> StagedRun:
        """A staged run on this session's model, kept as the request running now (kv_buffers)."""
        self._run = StagedRun(self.model, self._is_eos)
        return self._run

    def kv_buffers(self) -> list[torch.Tensor]:
        cache = None if self._run is None else self._run.cache
        layers = [] if cache is None else cache.layers
        return [
            t
            for layer in layers
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
            if isinstance(t, torch.Tensor)
        ]

    @property
    def module(self) -> nn.Module:
        return self.model

    def meta_module(self) -> nn.Module:
        return meta_model(self.hf_config)

    def module_stages(self) -> dict[str, str]:
        return dict(self.stage_prefixes)

    def routed_layers(self) -> list[RoutedLayer]:
        return list(self._gates)

    def execution(self) -> Execution:
        config = self.model.config
        return Execution(
            config._attn_implementation,
            str(config.text_config._experts_implementation),
            impl=self.cfg.impl,
            replaced=self._replaced,
        )

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            raise RuntimeError("DeepSeekOCR2Session.load() must run before the model is used")
        return self._model

    def _is_eos(self, token: torch.Tensor) -> bool:
        # Reading the token on the host is a device sync: skipped unless stopping at EOS.
        return self.options.stops_at_eos and int(token) == self.hf_config.text_config.eos_token_id
