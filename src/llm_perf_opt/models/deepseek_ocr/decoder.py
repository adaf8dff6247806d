"""DeepSeek MoE language model: RMSNorm, RoPE, multi-head attention with a KV cache,
dense SwiGLU (layer 0) and MoE (layers 1-11).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attend
from .config import LMConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Variance in fp32, cast back, *then* scale: the reference order.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class KVCache:
    """Preallocated keys and values for every layer: [B, heads, max_len, D] each.

    `length` positions are filled; prefill and decode write at `length` and the model
    advances it once per forward, after all layers.

    A batch of prompts of different lengths is left-padded to the longest: `pads` [B] holds
    each sequence's padding. Its positions (RoPE) then start after its padding, and no query
    sees a padded key (`attention_bias`). Without padding both are None and every forward
    takes the batch-1 path unchanged.
    """

    def __init__(
        self,
        cfg: LMConfig,
        max_len: int,
        batch: int,
        dtype: torch.dtype,
        device: torch.device,
        pads: Sequence[int] | None = None,
    ):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.length = 0
        self.pads: torch.Tensor | None = None  # [B] left padding of each sequence
        self.valid: torch.Tensor | None = None  # [B, max_len] positions holding a real token
        self.bias: torch.Tensor | None = None  # the running forward's attention bias (set by the model)
        if pads is not None:
            self.set_pads(pads)

    def set_pads(self, pads: Sequence[int]) -> None:
        """Mark the first pads[b] positions of sequence b as padding (all zero: no padding)."""
        if len(pads) != self.keys[0].shape[0]:
            raise ValueError(f"{len(pads)} paddings for a cache of batch {self.keys[0].shape[0]}")
        if not any(pads):
            self.pads = self.valid = None
            return
        device = self.keys[0].device
        self.pads = torch.tensor(list(pads), dtype=torch.long, device=device)
        self.valid = torch.arange(self.max_len, device=device)[None] >= self.pads[:, None]

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def positions(self, start: int, s: int) -> torch.Tensor:
        """Positions of the next s tokens: [S], or [B, S] counted from each sequence's first real token."""
        positions = torch.arange(start, start + s, device=self.keys[0].device)
        if self.pads is None:
            return positions
        return (positions[None] - self.pads[:, None]).clamp_min(0)

    def attention_bias(self, start: int, s: int, dtype: torch.dtype) -> torch.Tensor | None:
        """Additive bias [B, 1, s, start + s] for queries at start.. over every key so far: 0 where
        a query may look (a real key at or before it), −inf elsewhere; None without padding. A
        padded query sees itself, so its row is never all −inf (a NaN there would reach the
        real tokens through the values of later layers, where 0·NaN is NaN)."""
        if self.valid is None:
            return None
        end = start + s
        keys = torch.arange(end, device=self.valid.device)
        queries = torch.arange(start, end, device=self.valid.device)
        seen = (keys[None] <= queries[:, None]) & self.valid[:, None, :end]  # [B, s, end]
        seen |= keys[None] == queries[:, None]
        bias = torch.zeros(seen.shape, dtype=dtype, device=seen.device).masked_fill_(~seen, float("-inf"))
        return bias[:, None]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B,H,S,D] after the cached positions; return all keys and values so far."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin [S, D] (or [B, S, D] for positions [B, S]) for the half-split (NeoX/Llama) rotary
    embedding, computed in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig, layer: int, backend: str):
        super().__init__()
        d = cfg.hidden_size
        self.cfg, self.layer, self.backend = cfg, layer, backend
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache
    ) -> torch.Tensor:
        b, s, d = x.shape
        h, hd = self.cfg.num_attention_heads, self.cfg.head_dim
        q = self.q_proj(x).view(b, s, h, hd).transpose(1, 2)  # [B,H,S,D]
        k = self.k_proj(x).view(b, s, h, hd).transpose(1, 2)
        v = self.v_proj(x).view(b, s, h, hd).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        keys, values = cache.append(self.layer, k, v)  # [B,H,L+S,D]
        if cache.bias is not None:  # padded batch: the bias holds the causal mask and the padding
            out = attend(q, keys, values, backend=self.backend, bias=cache.bias)
        else:
            # Prefill starts from an empty cache (square causal mask); a single decode query sees everything.
            out = attend(q, keys, values, backend=self.backend, causal=s > 1)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, d))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Gate logits in fp32 over the routed experts (module name `gate`, weight [E, d])."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float())


RoutingHook = Callable[[torch.Tensor], None]


def tokens_per_expert(flat: torch.Tensor, n_experts: int) -> list[int]:
    """Tokens routed to each expert, on the host: one device sync per MoE layer (as the reference does)."""
    return torch.bincount(flat, minlength=n_experts).tolist()


class MoE(nn.Module):
    """Softmax top-k routing without renormalisation, plus always-on shared experts.

    y = Σ_k w_k · expert_k(x) (weights and sum in fp32) + shared(x).
    """

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.gate = Router(cfg)
        self.experts = nn.ModuleList(
            SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.n_routed_experts)
        )
        self.shared_experts = SwiGLU(cfg.hidden_size, cfg.shared_intermediate_size)
        # Called with the top-k expert ids [T, k] of every forward; set by whoever observes routing.
        self.on_route: RoutingHook | None = None
        # Sizes the per-expert batches. Replaced from outside where tensors carry no values
        # (the FLOP and byte validators run the model on the meta device).
        self.count_tokens: Callable[[torch.Tensor, int], list[int]] = tokens_per_expert

    @property
    def n_experts(self) -> int:
        return len(self.experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T, d]
        weights, experts = self.route(x)  # [T, k]
        return (self.routed(x, weights, experts).to(x.dtype) + self.shared_experts(x)).view(shape)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k softmax weights and expert ids [T, k] of the tokens x [T, d]; tells `on_route`."""
        weights, experts = self.gate(x).softmax(-1).topk(self.top_k, dim=-1, sorted=False)
        if self.on_route is not None:
            self.on_route(experts)
        return weights, experts

    def routed(
        self,
        x: torch.Tensor,
        weights: torch.Tensor,
        experts: torch.Tensor,
        run_expert: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Σ_k w_k · expert_k(x) in fp32 [T, d]: tokens grouped by expert, one expert at a time,
        each through `run_expert(e, rows)` (default: the expert's own module)."""
        run_expert = run_expert or (lambda e, rows: self.experts[e](rows))
        flat = experts.flatten()
        order = flat.argsort()
        token_of = order // self.top_k  # token of each (token, slot) pair, grouped by expert
        counts = self.count_tokens(flat, len(self.experts))
        grouped = x[token_of]  # [T·k, d]
        outs = [run_expert(e, chunk) for e, chunk in enumerate(grouped.split(counts)) if chunk.shape[0]]
        routed = torch.cat(outs).float() * weights.flatten()[order, None]
        return torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, token_of, routed)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LMConfig, index: int, backend: str):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, index, backend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(index) else SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, rope, cache: KVCache) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, cache)
        return x + self.mlp(self.post_attention_layernorm(x))
