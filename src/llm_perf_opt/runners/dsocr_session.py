"""DeepSeekOCRSession: owns the model, tokenizer and device, and runs one request stage by stage.

    session = DeepSeekOCRSession.from_local(None)             # dummy weights, CPU/CUDA auto
    result  = session.run(SAMPLE_PAGE, load_mode("base"), max_new_tokens=32)
    result.tokens                                              # 32 generated ids

or stage by stage: prepare → encode_images → prefill → decode.

Every stage runs inside `stage_range(<stage>)` (NVTX + record_function): `preprocess`,
`sam`, `clip`, `projector`, `prefill`, and one `decode` range per decode step. A `StageTimer`
passed to `run` times the same regions with device synchronisation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from llm_perf_opt.config import Settings, resolve_device
from llm_perf_opt.models.deepseek_ocr.attention import resolve_backend
from llm_perf_opt.models.deepseek_ocr.config import DeepSeekOCRConfig
from llm_perf_opt.models.deepseek_ocr.model import DeepSeekOCR
from llm_perf_opt.models.deepseek_ocr.modes import ModeSpec
from llm_perf_opt.models.deepseek_ocr.preprocess import SAMPLE_PAGE, ImageViews, load_image, preprocess_image
from llm_perf_opt.models.deepseek_ocr.routing import RoutingRecord, balance_router
from llm_perf_opt.models.deepseek_ocr.tokenizer import DEFAULT_PROMPT, Tokenizer, build_input_ids, load_tokenizer
from llm_perf_opt.models.deepseek_ocr.weights import dummy_model, load_checkpoint
from llm_perf_opt.profiling.module_ranges import attach_module_ranges
from llm_perf_opt.profiling.ranges import CLIP, DECODE, PREFILL, PREPROCESS, PROJECTOR, SAM, stage_range
from llm_perf_opt.profiling.timing import StageTimer


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


@dataclass
class Result:
    """Generated token ids, left on the device: reading them forces a device→host copy,
    which happens when `tokens` is first read, after the measured region."""

    ids: torch.Tensor  # [n]

    @functools.cached_property
    def tokens(self) -> list[int]:
        return self.ids.tolist()


class DeepSeekOCRSession:
    def __init__(
        self,
        model: DeepSeekOCR,
        tokenizer: Tokenizer,
        *,
        dummy_weights: bool,
        ignore_eos: bool | None = None,
        granularity: str = "stage",
        seed: int = 0,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.dummy_weights = dummy_weights
        # Dummy weights produce no meaningful stop token: decode the full budget by default.
        self.ignore_eos = dummy_weights if ignore_eos is None else ignore_eos
        self.seed = seed
        self._stage = PREPROCESS
        self._balanced_for: Request | None = None
        if granularity == "module":
            attach_module_ranges(model, lambda: self._stage)

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_config(cls, settings: Settings) -> DeepSeekOCRSession:
        return cls.from_local(
            settings.checkpoint,
            arch=settings.arch,
            device=settings.device,
            dtype=settings.dtype,
            attn_impl=settings.attn_impl,
            ignore_eos=settings.ignore_eos,
            granularity=settings.granularity,
            seed=settings.seed,
        )

    @classmethod
    def from_local(
        cls,
        path: str | Path | None,
        *,
        arch: DeepSeekOCRConfig | None = None,
        device: str | torch.device = "auto",
        dtype: torch.dtype = torch.bfloat16,
        attn_impl: str = "sdpa",
        ignore_eos: bool | None = None,
        granularity: str = "stage",
        seed: int = 0,
    ) -> DeepSeekOCRSession:
        """A local checkpoint folder (official layout, safetensors), or dummy weights when path is None."""
        device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
        backend = resolve_backend(attn_impl, device)
        if path is None:
            model = dummy_model(arch or DeepSeekOCRConfig(), device, dtype, backend, seed=seed)
        else:
            model = load_checkpoint(path, device, dtype, backend)
        tokenizer = load_tokenizer(None if path is None else Path(path))
        return cls(model, tokenizer, dummy_weights=path is None, ignore_eos=ignore_eos,
                   granularity=granularity, seed=seed)

    # -- stages -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _in_stage(self, name: str, timer: StageTimer | None):
        self._stage = name
        with stage_range(name), (timer.time(name) if timer else contextlib.nullcontext()):
            yield

    def prepare(
        self, image: str | Path | None, mode: ModeSpec, prompt: str = DEFAULT_PROMPT, timer: StageTimer | None = None
    ) -> Request:
        """Stage `preprocess`: load, resize/pad/tile, normalise, tokenise (host work)."""
        path = Path(image) if image is not None else SAMPLE_PAGE
        device = self.model.device
        with self._in_stage(PREPROCESS, timer):
            views = preprocess_image(load_image(path), mode)
            ids = build_input_ids(self.tokenizer, prompt, views.image_tokens)
            input_ids = torch.tensor([ids], dtype=torch.long).to(device, non_blocking=True)
            # The host→device copies of the pixels belong to preprocessing, not to SAM.
            views = dataclasses.replace(
                views,
                global_view=views.global_view.to(device, non_blocking=True),
                tiles=None if views.tiles is None else views.tiles.to(device, non_blocking=True),
            )
        return Request(path, mode, prompt, views, input_ids)

    @torch.inference_mode()
    def encode_images(self, request: Request, timer: StageTimer | None = None) -> torch.Tensor:
        """Stages `sam`, `clip`, `projector` over all views → image embeddings [N_img, hidden]."""
        views = request.views
        pixels = [views.global_view] + ([views.tiles] if views.tiles is not None else [])
        with self._in_stage(SAM, timer):
            sam_out = [self.model.sam(p) for p in pixels]
        with self._in_stage(CLIP, timer):
            clip_out = [self.model.clip(s) for s in sam_out]
        with self._in_stage(PROJECTOR, timer):
            feats = [self.model.project(s, c) for s, c in zip(sam_out, clip_out)]
            embeds = self.model.layout(feats[0], feats[1] if len(feats) > 1 else None, views.grid)
        return embeds

    @torch.inference_mode()
    def prefill(self, request: Request, image_embeds: torch.Tensor, max_new_tokens: int, timer=None):
        """Stage `prefill`: the LM over the whole prompt → (first generated token [1,1], cache)."""
        with self._in_stage(PREFILL, timer):
            cache = self.model.new_cache(request.prompt_tokens + max_new_tokens)
            logits = self.model.prefill(request.input_ids, image_embeds, cache)
            token = logits.argmax(-1, keepdim=True)
        return token, cache

    @torch.inference_mode()
    def decode(self, token: torch.Tensor, cache, steps: int, timer=None, on_step=None) -> list[torch.Tensor]:
        """Stage `decode`, one range per step: greedy, batch 1. Returns the tokens fed and produced."""
        tokens = [token]
        stop = self._is_eos(token)
        for _ in range(steps):
            if stop:
                break
            with self._in_stage(DECODE, timer):
                token = self.model.decode_step(token, cache).argmax(-1, keepdim=True)
                stop = self._is_eos(token)
            tokens.append(token)
            if on_step is not None:
                on_step()
        return tokens

    def _is_eos(self, token: torch.Tensor) -> bool:
        # Reading the token on the host is a device sync: skipped when EOS is ignored.
        return not self.ignore_eos and int(token) == self.tokenizer.eos_id

    # -- whole request ---------------------------------------------------------------------
    def run(
        self,
        image: str | Path | None,
        mode: ModeSpec,
        prompt: str = DEFAULT_PROMPT,
        max_new_tokens: int = 32,
        timer: StageTimer | None = None,
        on_step=None,
    ) -> Result:
        """preprocess → vision → prefill → up to max_new_tokens−1 decode steps, each in its stage.

        The first generated token comes from prefill's logits; each decode step adds one.
        """
        request = self.prepare(image, mode, prompt, timer)
        self.balance_routing(request)
        embeds = self.encode_images(request, timer)
        token, cache = self.prefill(request, embeds, max_new_tokens, timer)
        return Result(torch.cat(self.decode(token, cache, max_new_tokens - 1, timer, on_step)).flatten())

    def balance_routing(self, request: Request) -> None:
        """With dummy weights, fit the MoE gates to this request once (see models/…/routing.py)."""
        if not self.dummy_weights or self._same_request(request):
            return
        with torch.inference_mode():
            embeds = self.encode_images(request)
            balance_router(self.model, request.input_ids, embeds, seed=self.seed)
        self._balanced_for = request

    def _same_request(self, request: Request) -> bool:
        done = self._balanced_for
        return done is not None and (done.image_path, done.mode, done.prompt) == (
            request.image_path, request.mode, request.prompt,
        )

    @contextlib.contextmanager
    def record_routing(self):
        """Inside the block, count tokens per expert of every MoE layer in the first prefill and
        in each decode step after it; the recorder's `record` holds the result afterwards."""
        recorder = RoutingRecorder(list(self.model.moe_layers().values()), lambda: self._stage)
        try:
            yield recorder
        finally:
            recorder.detach()


class RoutingRecorder:
    """Observes MoE routing through each layer's `on_route` hook (one bincount per layer call)."""

    def __init__(self, layers: list, current_stage):
        self._layers = layers
        self._stage = current_stage
        self._prefill: list[list[int] | None] = [None] * len(layers)
        self._steps: list[list[list[int] | None]] = []
        for slot, moe in enumerate(layers):
            moe.on_route = functools.partial(self._observe, slot)

    def _observe(self, slot: int, experts: torch.Tensor) -> None:
        counts = torch.bincount(experts.flatten(), minlength=len(self._layers[slot].experts)).tolist()
        stage = self._stage()
        if stage == PREFILL and self._prefill[slot] is None:
            self._prefill[slot] = counts
        elif stage == DECODE:
            if slot == 0:  # layers run in order: the first MoE layer opens a new step
                self._steps.append([None] * len(self._layers))
            self._steps[-1][slot] = counts

    def detach(self) -> None:
        for moe in self._layers:
            moe.on_route = None

    @property
    def record(self) -> RoutingRecord:
        return RoutingRecord(prefill=self._prefill, decode=self._steps)
