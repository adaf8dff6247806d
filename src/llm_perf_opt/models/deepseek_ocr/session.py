"""DeepSeekOCRSession: DeepSeek-OCR behind the harness's ModelSession interface.

    session = DeepSeekOCRSession(model_cfg, SessionOptions(torch.device("cpu"), torch.float32))
    request = session.prepare(None, DEFAULT_PROMPT)      # stage `preprocess` (no weights needed)
    session.check(request, max_new_tokens=32)            # fits the context window?
    session.load()                                        # dummy weights or the checkpoint
    result = session.generate(request, max_new_tokens=32)
    result.tokens                                         # 32 generated ids

Every stage runs inside `stage_range(<stage>)` (NVTX + record_function + stage events):
`preprocess`, `sam`, `clip`, `projector`, `prefill`, and one `decode` range per decode step.
This is the one place the stage sequence is written: timers, routing recorders, nested module
ranges (llm_perf_opt.profiling) and the FLOP and byte counts (llm_perf_opt.analytic.counted)
attach from outside. With `SessionOptions(torch.device("meta"), ...)` the session builds and
runs the model on the meta device (shapes only).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import weakref
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llm_perf_opt.errors import UserError
from llm_perf_opt.models.deepseek_ocr.attention import resolve_backend
from llm_perf_opt.models.deepseek_ocr.config import DeepSeekOCRConfig, DeepSeekOCRModelConfig
from llm_perf_opt.models.deepseek_ocr.decoder import KVCache
from llm_perf_opt.models.deepseek_ocr.families import module_families
from llm_perf_opt.models.deepseek_ocr.fast import FastDeepSeekOCR
from llm_perf_opt.models.deepseek_ocr.fast.paths import OPTIONS, FastPaths
from llm_perf_opt.models.deepseek_ocr.fast.tuning import TunedPaths, tune_paths
from llm_perf_opt.models.deepseek_ocr.model import DeepSeekOCR
from llm_perf_opt.models.deepseek_ocr.modes import ModeSpec
from llm_perf_opt.models.deepseek_ocr.op_notes import op_notes
from llm_perf_opt.models.deepseek_ocr.preprocess import ImageViews, preprocess_image
from llm_perf_opt.models.deepseek_ocr.routing import balance_router
from llm_perf_opt.models.deepseek_ocr.stages import CLIP, DECODE, PREFILL, PREPROCESS, PROJECTOR, SAM, STAGES
from llm_perf_opt.models.deepseek_ocr.weights import (
    build_model,
    checkpoint_config,
    dummy_model,
    load_checkpoint,
)
from llm_perf_opt.models.interface import (
    ModelSession,
    OpNote,
    Result,
    RoutedLayer,
    SessionOptions,
    even_split,
)
from llm_perf_opt.models.kernels.linear import FEW_ROWS
from llm_perf_opt.models.pages import SAMPLE_PAGE, load_image
from llm_perf_opt.models.tokenizer import build_input_ids, load_tokenizer
from llm_perf_opt.runners.ranges import stage_range


@dataclass(frozen=True)
class Request:
    """One image + prompt, ready for the model (the output of the `preprocess` stage)."""

    image_path: Path
    mode: ModeSpec
    prompt: str
    views: ImageViews
    input_ids: torch.Tensor  # [1, S] on the model's device

    @property
    def prompt_tokens(self) -> int:
        return self.input_ids.shape[1]

    @property
    def text_tokens(self) -> int:
        return self.prompt_tokens - self.views.image_tokens

    @property
    def pages(self) -> tuple[Request, ...]:
        return (self,)

    @property
    def pads(self) -> tuple[int, ...]:
        return (0,)

    @property
    def batch_size(self) -> int:
        return 1

    def global_views(self) -> torch.Tensor:
        return self.views.global_view

    def tiles(self) -> torch.Tensor | None:
        return self.views.tiles

    def describe(self) -> dict[str, Any]:
        views = self.views
        return {
            "image": {"path": str(self.image_path), "size": list(views.source_size)},
            "mode": dataclasses.asdict(self.mode),
            "tiles": {
                "cols": views.grid[0],
                "rows": views.grid[1],
                "count": 0 if views.tiles is None else len(views.tiles),
            },
            "tokens": {"image": views.image_tokens, "text": self.text_tokens, "prompt": self.prompt_tokens},
        }

    def summary(self) -> str:
        (width, height), (cols, rows) = self.views.source_size, self.views.grid
        tiles = f"{cols}×{rows} tiles" if cols * rows > 1 else "no tiles"
        return (
            f"mode {self.mode.name}, image {width}×{height} ({self.image_path.name}), {tiles}; "
            f"prompt {self.prompt_tokens} tokens ({self.views.image_tokens} image, {self.text_tokens} text)"
        )


@dataclass(frozen=True)
class BatchRequest:
    """N pages with the same prompt, run together (the output of one `preprocess` stage).

    Prompts are left-padded to the longest (`pads`: padding of each); the pages' global views
    are stacked and their tiles concatenated, page by page, so that SAM, CLIP and the projector
    each run once per view size over the whole batch.
    """

    pages: tuple[Request, ...]
    input_ids: torch.Tensor  # [N, S_max] on the model's device, left-padded
    pads: tuple[int, ...]
    stacked_views: torch.Tensor  # [N, 3, G, G]
    stacked_tiles: torch.Tensor | None  # [Σ tiles, 3, t, t]

    @property
    def prompt_tokens(self) -> int:
        return self.input_ids.shape[1]

    @property
    def batch_size(self) -> int:
        return len(self.pages)

    @property
    def mode(self) -> ModeSpec:
        return self.pages[0].mode

    def global_views(self) -> torch.Tensor:
        return self.stacked_views

    def tiles(self) -> torch.Tensor | None:
        return self.stacked_tiles

    def describe(self) -> dict[str, Any]:
        pages = [page.describe() for page in self.pages]
        image = [page["tokens"]["image"] for page in pages]
        return {
            "batch": {
                "size": self.batch_size,
                "padding": "left",
                "pads": list(self.pads),
                "padded_prompt_tokens": self.prompt_tokens,
            },
            "mode": pages[0]["mode"],
            "tokens": {
                "image": sum(image),
                "text": sum(p["tokens"]["text"] for p in pages),
                "prompt": sum(p["tokens"]["prompt"] for p in pages),
                "image_per_page": image,
            },
            "pages": pages,
        }

    def summary(self) -> str:
        tokens = [page.prompt_tokens for page in self.pages]
        images = sorted({page.image_path.name for page in self.pages})
        shown = ", ".join(images[:3]) + (f" and {len(images) - 3} more" if len(images) > 3 else "")
        head = f"mode {self.mode.name}, batch of {self.batch_size} pages ({shown}); "
        if min(tokens) == max(tokens):
            return head + f"prompts of {tokens[0]} tokens"
        return head + f"prompts {min(tokens)}–{max(tokens)} tokens, left-padded to {self.prompt_tokens}"


@dataclass(frozen=True)
class Execution:
    """How DeepSeek-OCR ran: the implementation, the fast paths it took on this device and
    dtype (None for the reference) and how they were chosen, and the positions of the KV cache
    it allocated."""

    impl: str
    paths: FastPaths | None
    cache_len: int
    tuned: TunedPaths | None = None
    batch: int = 1  # sequences the request ran together

    def as_dict(self) -> dict[str, Any]:
        paths = None if self.paths is None else self.paths.as_dict()
        choice = (
            None if self.tuned is None else {k: v for k, v in self.tuned.as_dict().items() if k != "paths"}
        )
        return {
            "impl": self.impl,
            "paths": paths,
            "path_choice": choice,
            "kv_cache_positions": self.cache_len,
            "batch": self.batch,
            "notes": [] if self.tuned is None else self.tuned.notes(),
        }

    def summary(self) -> str:
        if self.paths is None:
            return "model.impl=reference: the faithful implementation, op for op as released"
        p = self.paths
        sam = {
            "reference": "with the reference's materialised bias",
            "blocked": f"blocked over query tiles (bias tiles of at most {p.bias_tile_elements:,} elements)",
            "folded": "folded into the dot product (no N×N bias)",
        }[p.sam_attention]
        decode_path = (
            "graph" if p.graphs_decode(self.batch) else "static" if p.decode == "graph" else p.decode
        )
        decode = {
            "eager": "eager steps",
            "static": f"positioned steps over a static {self.cache_len}-position cache",
            "graph": f"CUDA-graph replays over a static {self.cache_len}-position cache (with "
            "profiling.granularity=module the trace pass decodes with the reference's eager steps, "
            "as forward hooks do not fire in a replay: its decode busy times are of those steps)",
        }[decode_path]
        linear = {"split": "split into row blocks", "plain": "as F.linear"}[p.linear]
        rows = {"weight_major": "weight-major", "plain": "as F.linear"}[p.rows]
        return (
            f"model.impl=fast: SAM attention {sam}; routed experts {p.moe_prefill} in prefill, "
            f"{p.routed_for(self.batch).replace('_', ' ')} in decode; decode as {decode}; one-token products {linear}"
            + (f", a batch's few-row products {rows}" if 1 < self.batch <= FEW_ROWS else "")
        )


#: The parameter group of prefill and decode, which share every language-model weight.
LANGUAGE_MODEL = "language_model"


def _without_grad(method: Callable) -> Callable:
    """Run `method` under the session's grad mode (DeepSeekOCRSession.grad_mode)."""

    @functools.wraps(method)
    def run(self: DeepSeekOCRSession, *args, **kwargs):
        with self.grad_mode():
            return method(self, *args, **kwargs)

    return run


class DeepSeekOCRSession(ModelSession):
    stages = STAGES
    compute_groups = {"vision": (SAM, CLIP, PROJECTOR), "prefill": (PREFILL,)}
    bandwidth_groups = {"decode": (DECODE,)}
    #: Checkpoint-name prefixes of each stage's weights. The newline and separator vectors
    #: are laid out with the projector's output, so they count with the projector.
    stage_prefixes = {
        "model.sam_model": SAM,
        "model.vision_model": CLIP,
        "model.projector": PROJECTOR,
        "model.image_newline": PROJECTOR,
        "model.view_seperator": PROJECTOR,
        "model.embed_tokens": LANGUAGE_MODEL,
        "model.layers": LANGUAGE_MODEL,
        "model.norm": LANGUAGE_MODEL,
        "lm_head": LANGUAGE_MODEL,
    }

    def __init__(self, cfg: DeepSeekOCRModelConfig, options: SessionOptions) -> None:
        super().__init__(cfg, options)
        self.checkpoint = None if cfg.dummy_weights else Path(cfg.weights).expanduser()
        # A checkpoint brings its own architecture; `model.arch` describes dummy-weight models.
        self.arch: DeepSeekOCRConfig = (
            cfg.arch if self.checkpoint is None else checkpoint_config(self.checkpoint)
        )
        self.backend = resolve_backend(cfg.attn_impl, options.device, options.dtype)
        self.tokenizer = load_tokenizer(self.checkpoint)
        self._model: DeepSeekOCR | None = None
        self._fitted_to: tuple | None = None
        self._cache_len = 0
        self._batch = 1
        self._cache: weakref.ref[KVCache] | None = None  # the running request's, not kept alive
        self._tuned: TunedPaths | None = None

    # -- the interface -----------------------------------------------------------------------
    def prepare(self, image: str | Path | None, prompt: str) -> Request:
        """Stage `preprocess`: load, resize/pad/tile, normalise, tokenise, copy to the device."""
        with stage_range(PREPROCESS):
            return self._page(image, prompt)

    def prepare_batch(self, images: Sequence[str | Path | None], prompt: str) -> Request | BatchRequest:
        """Stage `preprocess` for a batch: every page as `prepare` does, then the prompts
        left-padded into one [N, S_max] tensor and the views stacked (BatchRequest)."""
        if len(images) == 1:
            return self.prepare(images[0], prompt)
        with stage_range(PREPROCESS):
            pages = tuple(self._page(image, prompt) for image in images)
            longest = max(page.prompt_tokens for page in pages)
            pads = tuple(longest - page.prompt_tokens for page in pages)
            # The padding id is never seen: padded keys are masked and padded positions' outputs unread.
            input_ids = torch.cat(
                [
                    F.pad(page.input_ids, (pad, 0), value=self.tokenizer.eos_id)
                    for page, pad in zip(pages, pads)
                ]
            )
            tiles = [page.views.tiles for page in pages if page.views.tiles is not None]
            return BatchRequest(
                pages,
                input_ids,
                pads,
                torch.cat([page.views.global_view for page in pages]),
                torch.cat(tiles) if tiles else None,
            )

    def _page(self, image: str | Path | None, prompt: str) -> Request:
        path = Path(image) if image is not None else SAMPLE_PAGE
        device = self.options.device
        views = preprocess_image(load_image(path), self.cfg.mode)
        ids = build_input_ids(self.tokenizer, prompt, views.image_tokens)
        if ids.count(self.tokenizer.image_id) != views.image_tokens:
            raise UserError(
                f"prompt: its text encodes extra {self.tokenizer.image_id} (<image>) ids; "
                f"the page needs exactly {views.image_tokens}"
            )
        input_ids = torch.tensor([ids], dtype=torch.long).to(device, non_blocking=True)
        # The host→device copies of the pixels belong to preprocessing, not to SAM.
        views = dataclasses.replace(
            views,
            global_view=views.global_view.to(device, non_blocking=True),
            tiles=None if views.tiles is None else views.tiles.to(device, non_blocking=True),
        )
        return Request(path, self.cfg.mode, prompt, views, input_ids)

    def check(self, request: Request | BatchRequest, max_new_tokens: int) -> None:
        window = self.arch.lm.max_position_embeddings
        needed = request.prompt_tokens + max_new_tokens
        if needed > window:
            longest = max(request.pages, key=lambda page: page.prompt_tokens)
            raise UserError(
                f"max_new_tokens={max_new_tokens}: the {'longest ' if request.batch_size > 1 else ''}prompt has "
                f"{request.prompt_tokens} tokens ({longest.views.image_tokens} for the image), so {needed} positions "
                f"exceed the context window of {window}; use max_new_tokens <= {window - request.prompt_tokens}"
            )

    def load(self) -> None:
        # Building, tuning (it synchronises and caches per device) and any capture run on the
        # GPU the session names, not on whichever is current.
        with self._on_device():
            self._load()

    def _on_device(self) -> AbstractContextManager:
        device = self.options.device
        return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()

    def _load(self) -> None:
        device, dtype = self.options.device, self.options.dtype
        impl = self.cfg.impl
        if self.meta:
            self._model = build_model(self.arch, device, dtype, self.backend, impl=impl)
            for moe in self._model.moe_layers().values():
                moe.count_tokens = even_split
        elif self.checkpoint is None:
            self._model = dummy_model(
                self.arch, device, dtype, self.backend, seed=self.options.seed, impl=impl
            )
        else:
            self._model = load_checkpoint(self.checkpoint, device, dtype, self.backend, impl=impl)
        if isinstance(self._model, FastDeepSeekOCR):
            paths = self.cfg.paths
            if self.meta:  # nothing to time on meta: every choice is named
                self._model.use_paths(_forced_paths(paths.forced()))
            else:
                self._tuned = tune_paths(self._model, self.cfg.mode, paths.forced(), refresh=paths.refresh)
                self._model.use_paths(self._tuned.paths)

    @property
    def meta(self) -> bool:
        """Whether the model is built on the meta device: shapes only, for counting costs."""
        return self.options.device.type == "meta"

    def grad_mode(self) -> AbstractContextManager:
        """inference_mode, or on meta no_grad: under inference_mode a dispatch mode sees composite
        ops whole, and the byte count would miss the copies inside them (analytic.byte_count)."""
        return torch.no_grad() if self.meta else torch.inference_mode()

    @_without_grad
    def generate(self, request: Request | BatchRequest, max_new_tokens: int) -> Result:
        """Vision → prefill → up to max_new_tokens−1 decode steps, each in its stage range.

        The first generated token comes from prefill's logits; each decode step adds one to
        every sequence of the batch.
        """
        embeds = self.encode_images(request)
        token, cache = self.prefill(request, embeds, max_new_tokens)
        ids = torch.cat(self.decode(token, cache, max_new_tokens - 1), dim=1)  # [N, n]
        eos = self.tokenizer.eos_id if self.options.stops_at_eos else None
        return Result(ids.flatten() if request.batch_size == 1 else ids, eos)

    @_without_grad
    def fit_dummy_weights(self, request: Request | BatchRequest) -> None:
        """With dummy weights, fit the MoE gates once to the request's first page (see
        models/…/routing.py): a batch of copies of a page then routes as that page does alone.
        A meta model has no weights to fit."""
        page = request.pages[0]
        key = (page.image_path, page.prompt)
        if self.checkpoint is not None or self.meta or self._fitted_to == key:
            return
        # The vision stages as generate runs them, without ranges: nothing is measured here.
        embeds = self._encode(page, _no_range)
        balance_router(self.model, page.input_ids, embeds, seed=self.options.seed)
        self._fitted_to = key

    @_without_grad
    def setup(self, request: Request | BatchRequest, max_new_tokens: int) -> None:
        """The fast model's static KV cache for this request's size, made now: on CUDA with the
        graph decode its decode step is captured (and replayed once) here, outside every stage
        range, and prefill's `new_cache` then reuses it. Nothing for the reference."""
        if isinstance(self._model, FastDeepSeekOCR) and not self.meta:
            with self._on_device():
                self.model.new_cache(request.prompt_tokens + max_new_tokens, request.batch_size, request.pads)

    @property
    def module(self) -> nn.Module:
        return self.model

    def meta_module(self) -> nn.Module:
        with torch.device("meta"):
            return DeepSeekOCR(self.arch, self.backend)

    def module_stages(self) -> dict[str, str]:
        return dict(self.stage_prefixes)

    def module_families(self) -> dict[str, str]:
        return module_families(self.model)

    def routed_layers(self) -> list[RoutedLayer]:
        return list(self.model.moe_layers().values())

    def kv_buffers(self) -> list[torch.Tensor]:
        cache = None if self._cache is None else self._cache()
        return [] if cache is None else cache.keys + cache.values

    def op_notes(self) -> tuple[OpNote, ...]:
        return op_notes(self.cfg.impl)

    def execution(self) -> Execution:
        model = self.model
        paths = model.paths if isinstance(model, FastDeepSeekOCR) else None
        return Execution(self.cfg.impl, paths, self._cache_len, self._tuned, self._batch)

    # -- the stages, usable one by one ------------------------------------------------------------
    @property
    def model(self) -> DeepSeekOCR:
        if self._model is None:
            raise RuntimeError("DeepSeekOCRSession.load() must run before the model is used")
        return self._model

    @_without_grad
    def encode_images(self, request: Request | BatchRequest) -> torch.Tensor:
        """Stages `sam`, `clip`, `projector` over all views → image embeddings [N_img, hidden]
        (a batch: every page's, page after page)."""
        return self._encode(request, stage_range)

    def _encode(
        self, request: Request | BatchRequest, ranges: Callable[[str], AbstractContextManager]
    ) -> torch.Tensor:
        """The vision stages, each inside `ranges(stage)`: the global views as one batch, then
        every tile of every page as one batch."""
        model = self.model
        tiles = request.tiles()
        pixels = [request.global_views()] + ([tiles] if tiles is not None else [])
        with ranges(SAM):
            sam_out = [model.sam(p) for p in pixels]
        with ranges(CLIP):
            clip_out = [model.clip(s) for s in sam_out]
        with ranges(PROJECTOR):
            feats = [model.project(s, c) for s, c in zip(sam_out, clip_out)]
            if request.batch_size == 1:
                return model.layout(feats[0], feats[1] if len(feats) > 1 else None, request.views.grid)
            return torch.cat(_page_layouts(model, request, feats))

    @_without_grad
    def prefill(self, request: Request | BatchRequest, image_embeds: torch.Tensor, max_new_tokens: int):
        """Stage `prefill`: the LM over the whole prompt → (first generated tokens [N,1], cache)."""
        with stage_range(PREFILL):
            self._cache_len, self._batch = request.prompt_tokens + max_new_tokens, request.batch_size
            cache = self.model.new_cache(self._cache_len, request.batch_size, request.pads)
            self._cache = weakref.ref(cache)
            logits = self.model.prefill(request.input_ids, image_embeds, cache)
            return logits.argmax(-1, keepdim=True), cache

    @_without_grad
    def decode(self, token: torch.Tensor, cache, steps: int) -> list[torch.Tensor]:
        """Stage `decode`, one range per step: greedy, every sequence of the batch each step
        (token [N,1]). Returns the tokens fed and produced. Stopping at EOS, a sequence that
        produced EOS keeps stepping with the others (its later tokens are not counted, see
        Result.lengths) and decoding ends when every sequence has."""
        tokens = [token]
        done = self._at_eos(token)
        for _ in range(steps):
            if done is not None and bool(done.all()):
                break
            with stage_range(DECODE):
                token = self.model.decode_step(token, cache).argmax(-1, keepdim=True)
                if done is not None:
                    done |= self._at_eos(token)
            tokens.append(token)
        return tokens

    def _at_eos(self, token: torch.Tensor) -> torch.Tensor | None:
        # Testing `done` on the host is a device sync each step: only when stopping at EOS.
        return token == self.tokenizer.eos_id if self.options.stops_at_eos else None


def _no_range(name: str) -> AbstractContextManager:
    return contextlib.nullcontext()


def _forced_paths(forced: dict[str, str]) -> FastPaths:
    """The fast paths of a meta-device model, all named in the config (nothing to time there)."""
    missing = [f.name for f in dataclasses.fields(FastPaths) if f.name in OPTIONS and f.name not in forced]
    if missing:
        raise UserError(
            "model.impl=fast on the meta device: name every path ("
            + ", ".join(f"model.paths.{m}=..." for m in missing)
            + ")"
        )
    return FastPaths(**forced)


def _page_layouts(model: DeepSeekOCR, request: BatchRequest, feats: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each page's image embeddings laid out from its slices of the batch's global and tile features."""
    out, first_tile = [], 0
    for i, page in enumerate(request.pages):
        grid, tiles = page.views.grid, page.views.tiles
        count = 0 if tiles is None else tiles.shape[0]
        page_tiles = feats[1][first_tile : first_tile + count] if count else None
        out.append(model.layout(feats[0][i : i + 1], page_tiles, grid))
        first_tile += count
    return out
