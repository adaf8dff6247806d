"""FastDeepSeekOCR: the reference model with its fast modules swapped in, and CUDA-graph decode.

Same module tree, parameter names and state dict as `model.DeepSeekOCR`; only forwards differ:

* SAM attention without the N×N bias tensor (`sam.FastSamAttention`), in-place GELU;
* MoE layers without host synchronisation on CUDA (`moe.FastMoE`);
* the language model's bias-free Linears (attention, dense and shared MLPs, lm_head) as
  `kernels.linear.FastLinear`: one-token products at the memory bandwidth on CPU in fp32;
* on CUDA, decode steps replayed from a CUDA graph over a static KV cache (`decoder`, `graphs`),
  except while something observes the decode modules (a routing hook or forward hooks would
  not fire inside a replay; such steps run the same positioned step eagerly, or the
  reference's decode when forward hooks are set).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from llm_perf_opt.models.kernels.linear import FastLinear, use_fast_linears

from ..config import DeepSeekOCRConfig
from ..decoder import KVCache, MoE, rope_cos_sin
from ..model import DeepSeekOCR
from .decoder import FastAttention, PositionedStep, StaticKVCache
from .graphs import DecodeGraph
from .moe import FastMoE
from .paths import FastPaths, choose_paths
from .sam import FastSamAttention, FastSamMLP


def install_fast_modules(model: DeepSeekOCR) -> None:
    """Replace, in a freshly built model whose weights are not written yet (meta or uninitialised),
    every module that has a fast form by a fast instance with the same parameters and names."""
    cfg = model.cfg
    for block in model.model.sam_model.blocks:
        grid = (block.attn.rel_pos_h.shape[0] + 1) // 2
        block.attn = FastSamAttention(cfg.sam, grid)
        block.mlp = FastSamMLP(cfg.sam)
    for index, layer in enumerate(model.model.layers):
        layer.self_attn = FastAttention(cfg.lm, index, layer.self_attn.backend)
        use_fast_linears(layer.self_attn)
        if isinstance(layer.mlp, MoE):
            layer.mlp = FastMoE(cfg.lm)
            # Routed experts run from their stacked weights, not through their own Linears.
            use_fast_linears(layer.mlp.shared_experts)
        else:
            use_fast_linears(layer.mlp)
    model.lm_head = FastLinear(cfg.lm.hidden_size, cfg.lm.vocab_size, bias=False)


class FastDeepSeekOCR(DeepSeekOCR):
    """`DeepSeekOCR` built with its fast modules (`install_fast_modules`); adds static-cache,
    CUDA-graph decode. Build it with `weights.build_model(..., impl="fast")`, which allocates
    the stacked expert storage once (`to_empty`)."""

    def __init__(self, cfg: DeepSeekOCRConfig, backend: str = "sdpa"):
        super().__init__(cfg, backend)
        install_fast_modules(self)
        self._static_cache: StaticKVCache | None = None
        self._fixed_paths: FastPaths | None = None

    @property
    def paths(self) -> FastPaths:
        """The paths the fast modules take on this model's device and dtype (or the fixed ones)."""
        return self._fixed_paths or choose_paths(self.device, self.dtype)

    def use_paths(self, paths: FastPaths | None) -> None:
        """Run these paths whatever the device (None: choose by device again). For checks that
        exercise one device's paths on another, e.g. the analytic bytes of CUDA's on CPU; a
        "graph" decode still captures only on CUDA."""
        self._fixed_paths = paths
        self._static_cache = None
        for module in self.modules():
            if isinstance(module, (FastSamAttention, FastMoE)):
                module.paths = paths
            elif isinstance(module, FastLinear):
                module.split = paths is None or paths.linear == "split"
                module.rows = paths is None or paths.rows == "weight_major"

    def to_empty(self, *, device, recurse: bool = True) -> FastDeepSeekOCR:
        """Uninitialised storage on `device`, allocated once: each MoE layer's stacked expert
        tensors are allocated and the experts' weights re-pointed into them (allocating the
        per-expert weights as well would briefly need the 2.4 B routed parameters twice)."""
        if not recurse:
            return super().to_empty(device=device, recurse=False)
        moes = [m for m in self.modules() if isinstance(m, FastMoE)]
        stacked = {id(sub) for moe in moes for sub in moe.experts.modules()}
        for module in self.modules():
            if id(module) not in stacked:
                nn.Module.to_empty(module, device=device, recurse=False)
        for moe in moes:
            moe.tie_experts()
        return self

    # -- decode ------------------------------------------------------------------------------
    def new_cache(self, max_len: int, batch: int = 1, pads: Sequence[int] | None = None) -> KVCache:
        """With "static" or "graph" decode paths, a static cache; on CUDA with "graph", its decode
        steps replay a CUDA graph: the same buffers and graph serve every request of the same
        size and padding, and the graph is captured here, when the cache is first made (in a
        harness job: by the session's untimed `setup`, outside every stage range; prefill's call
        then finds the cache made). Forward hooks on the decode
        modules (routing refits, module ranges) would not fire inside a replay, nor may they run
        during capture: with any set, the cache is the reference's and decoding is eager."""
        if self.paths.decode == "eager" or self._decode_hooks():
            return super().new_cache(max_len, batch, pads)
        pads = tuple(pads or (0,) * batch)
        cache = self._static_cache
        if cache is None or (cache.max_len, cache.keys[0].shape[0], cache.pad_key) != (max_len, batch, pads):
            self._static_cache = None  # release the old buffers and graph before allocating
            cache = StaticKVCache(self.cfg.lm, max_len, batch, self.dtype, self.device, pads)
            if self.captures_graphs(batch):
                # Captured at position 0; its warm-up steps write there, and prefill overwrites it.
                with self._routing_hooks_suspended():
                    cache.graph = DecodeGraph(lambda: self.positioned_step(cache), self.device)
            self._static_cache = cache
        cache.length = 0
        return cache

    def captures_graphs(self, batch: int) -> bool:
        """Whether a new static cache for `batch` sequences gets a CUDA graph of its decode step."""
        return self.paths.graphs_decode(batch) and self.device.type == "cuda"

    def decode_step(self, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """token [B,1] → logits [B, vocab]. A static cache takes the positioned step: replayed
        from its CUDA graph, or run eagerly where there is none (off CUDA) or while routing is
        observed (the hook reads expert ids on the host)."""
        if not isinstance(cache, StaticKVCache):
            return super().decode_step(token, cache)
        if cache.length + 1 > cache.max_len:
            raise ValueError(f"KV cache of {cache.max_len} positions cannot hold {cache.length + 1}")
        cache.token.copy_(token)
        cache.position.fill_(cache.length)
        if cache.graph is not None and not self._routing_observed():
            logits = cache.graph.replay()
        else:
            logits = self.positioned_step(cache)
        cache.length += 1
        return logits

    def positioned_step(self, cache: StaticKVCache) -> torch.Tensor:
        """One decode step that reads its token and position from `cache.token` and
        `cache.position` (device tensors): logits [B, vocab] fp32. `cache.length` is the
        caller's to advance. This is the body a CUDA graph captures."""
        lm = self.cfg.lm
        x = self.model.embed_tokens(cache.token)  # [B,1,d]
        visible = (torch.arange(cache.max_len, device=x.device) <= cache.position)[None]  # [1, max_len]
        if cache.pads is None:
            cos, sin = rope_cos_sin(cache.position, lm.head_dim, lm.rope_theta, x.dtype)  # [1, D]
        else:  # a padded batch: positions after each sequence's padding, no padded key visible
            cos, sin = rope_cos_sin(
                (cache.position - cache.pads)[:, None], lm.head_dim, lm.rope_theta, x.dtype
            )
            cos, sin = cos[:, None], sin[:, None]  # [B,1,1,D]
            visible = (visible & cache.valid)[:, None, None]  # [B,1,1,max_len]
        step = PositionedStep(cache, visible)
        for layer in self.model.layers:
            x = layer(x, (cos, sin), step)
        return self.lm_head(self.model.norm(x[:, -1])).float()

    def _routing_observed(self) -> bool:
        return any(moe.on_route is not None for moe in self.moe_layers().values())

    @contextmanager
    def _routing_hooks_suspended(self) -> Iterator[None]:
        moes = list(self.moe_layers().values())
        hooks = [moe.on_route for moe in moes]
        for moe in moes:
            moe.on_route = None
        try:
            yield
        finally:
            for moe, hook in zip(moes, hooks):
                moe.on_route = hook

    def _decode_hooks(self) -> bool:
        """Whether forward hooks watch any module a decode step runs (or every module)."""
        module = nn.modules.module
        if module._global_forward_hooks or module._global_forward_pre_hooks:
            return True
        roots = (self.model.embed_tokens, self.model.layers, self.model.norm, self.lm_head)
        return any(m._forward_hooks or m._forward_pre_hooks for root in roots for m in root.modules())
