"""Realistic MoE routing under dummy weights.

With plain random gate weights almost every token goes to the same few experts: the
hidden states of a prompt share a large common component (image tokens especially), and
a random gate maps that component to one fixed logit vector that dominates every token's
top-k. A trained router does the opposite: it spreads the tokens of a page over all experts.

`balance_router` makes dummy weights behave like the trained router *for the prompt being
profiled* by choosing the gate weights only; the computation that runs (fp32 gate matmul,
softmax, top-k, expert SwiGLUs) is untouched. For each MoE layer, in order, it takes the
layer's actual gate inputs X [T, d] from one calibration prefill and sets

    W = R · Σ⊥^(-1/2) · (I − m̂ m̂ᵀ)

where m̂ is the direction of mean(X), Σ⊥ the covariance of X with that direction removed
(restricted to its non-degenerate span) and R a seeded Gaussian [E, r] scaled so logits have
unit spread. Each expert's logit is then
a unit-variance projection of the whitened token, identically distributed for all experts,
so every expert expects the same share T·k/E of the assignments.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .config import LMConfig
from .model import DeepSeekOCR

# Singular directions weaker than this fraction of the strongest are noise, not signal.
RELATIVE_RANK_CUTOFF = 1e-4


@torch.no_grad()
def balanced_gate_weight(x: torch.Tensor, n_experts: int, generator: torch.Generator) -> torch.Tensor:
    """Gate weight [E, d] that routes the rows of x [T, d] evenly in expectation."""
    x = x.reshape(-1, x.shape[-1]).float().cpu()
    mean = x.mean(0)
    direction = mean / mean.norm().clamp_min(1e-12)
    # Drop the shared component first: what is left of each token is what tells tokens apart.
    rest = x - (x @ direction)[:, None] * direction[None, :]
    _, s, vh = torch.linalg.svd(rest - rest.mean(0), full_matrices=False)
    keep = s > s[0] * RELATIVE_RANK_CUTOFF
    whiten = vh[keep] / (s[keep] / x.shape[0] ** 0.5)[:, None]  # [r, d]: unit variance per direction
    whiten = whiten - (whiten @ direction)[:, None] * direction[None, :]
    mix = torch.randn(n_experts, whiten.shape[0], generator=generator) / whiten.shape[0] ** 0.5
    return mix @ whiten


@torch.no_grad()
def balance_router(
    model: DeepSeekOCR, input_ids: torch.Tensor, image_embeds: torch.Tensor, seed: int = 0
) -> None:
    """Refit every MoE gate of a dummy-weight model on this prompt (see module docstring)."""
    generator = torch.Generator().manual_seed(seed)

    def refit(module, args):
        weight = balanced_gate_weight(args[0], module.gate.weight.shape[0], generator)
        module.gate.weight.copy_(weight.to(module.gate.weight))

    # Layers run in order, so each gate is fitted to inputs produced by the refitted layers before it.
    handles = [moe.register_forward_pre_hook(refit) for moe in model.moe_layers().values()]
    try:
        model.prefill(input_ids, image_embeds, model.new_cache(input_ids.shape[1]))
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class RoutingRecord:
    """Per-expert token counts a run recorded, MoE layers in order.

    prefill[l][e]: prompt tokens that MoE layer l sent to expert e.
    decode[s][l][e]: the same for decode step s (each step routes one token per sequence).
    """

    prefill: Sequence[Sequence[int]]
    decode: Sequence[Sequence[Sequence[int]]] = ()

    def check(self, lm: LMConfig, prompt_tokens: int, decode_steps: int, batch: int = 1) -> None:
        """Shapes and totals must match the run: every token goes to exactly top_k experts
        (prompt_tokens in prefill, all of a batch's; `batch` in each decode step).

        The counts come from the run's own recorder, so a mismatch is a bug (ValueError).
        """
        layers = sum(lm.is_moe_layer(i) for i in range(lm.num_hidden_layers))
        k, e = lm.num_experts_per_tok, lm.n_routed_experts
        if self.decode and len(self.decode) != decode_steps:
            raise ValueError(f"routing: {len(self.decode)} decode steps recorded, the run has {decode_steps}")
        for where, tokens, per_layer in [("prefill", prompt_tokens, self.prefill)] + [
            (f"decode step {s}", batch, step) for s, step in enumerate(self.decode)
        ]:
            if len(per_layer) != layers or any(len(counts) != e for counts in per_layer):
                raise ValueError(f"routing: {where} needs {layers} MoE layers x {e} expert counts")
            for counts in per_layer:
                if min(counts) < 0 or sum(counts) != tokens * k:
                    raise ValueError(f"routing: {where} counts must be >= 0 and sum to {tokens} x {k}")
