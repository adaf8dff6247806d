"""Analytic cost of one call of each module family, from shapes and a dtype alone.

Conventions shared by every function here:

* FLOPs: 2 per multiply-add. `matmul_flops` is the work of matrix products and convolutions
  (what `torch.utils.flop_counter.FlopCounterMode` counts: mm, addmm, bmm, convolution,
  attention). `other_flops` is elementwise and reduction work, one FLOP per arithmetic
  operation or transcendental per element; the per-element constants are below. Bias adds
  are other FLOPs (FlopCounterMode counts addmm as its matmul only).
* Bytes: the sum over the family's kernels of each operand read once and each result written
  once, as eager PyTorch runs them (no reuse between kernels, no cache effects). Attention
  is one fused kernel that never writes its score matrix; an additive mask it is given is
  materialised and read. Weights are read once per call, in the call's dtype.
* `kv_write_bytes` are K/V rows appended to a cache; `kv_read_bytes` are K/V rows an
  attention kernel reads from it (the rows just appended included).
* `masked_matmul_flops` is the part of `matmul_flops` that a causal mask discards: a dense
  kernel executes it, a causal kernel that skips masked tiles does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from llm_perf_opt.errors import UserError

# Other-FLOPs per element (one per arithmetic op or transcendental).
LAYERNORM_FLOPS = 7  # mean: sum; var: subtract, square, sum; scale by rstd; affine mul + add
RMSNORM_FLOPS = 4  # square, sum, scale by rsqrt, multiply by the weight
SOFTMAX_FLOPS = 5  # max, subtract, exp, sum, divide
GELU_FLOPS = 5  # x / sqrt(2), erf, + 1, * 0.5, * x
SIGMOID_FLOPS = 4  # negate, exp, + 1, reciprocal
QUICK_GELU_FLOPS = SIGMOID_FLOPS + 2  # x * sigmoid(1.702 x)
SILU_GATED_FLOPS = SIGMOID_FLOPS + 2  # x * sigmoid(x) * up
ROPE_FLOPS = 3  # x * cos + rotate_half(x) * sin

_DTYPE_BYTES = {
    "float64": 8,
    "double": 8,
    "float32": 4,
    "float": 4,
    "fp32": 4,
    "float16": 2,
    "half": 2,
    "fp16": 2,
    "bfloat16": 2,
    "bf16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "fp8": 1,
    "int64": 8,
    "long": 8,
    "int32": 4,
    "int8": 1,
    "uint8": 1,
}
INDEX_BYTES = 8  # token ids are int64


def dtype_bytes(dtype: object) -> int:
    """Bytes per element of a torch dtype or of its name ("bfloat16", "torch.float16", "bf16")."""
    if not isinstance(dtype, str):
        itemsize = getattr(dtype, "itemsize", None)  # torch.dtype
        if isinstance(itemsize, int):
            return itemsize
    name = str(dtype).removeprefix("torch.").lower()
    if name not in _DTYPE_BYTES:
        raise UserError(f"dtype: unknown dtype {dtype!r}; use e.g. 'bfloat16', 'float16' or 'float32'")
    return _DTYPE_BYTES[name]


@dataclass(frozen=True)
class Cost:
    """FLOPs and bytes of some work; adds up and scales (a module called n times is n * cost)."""

    matmul_flops: float = 0
    other_flops: float = 0
    weight_bytes: float = 0
    act_read_bytes: float = 0
    act_write_bytes: float = 0
    kv_read_bytes: float = 0
    kv_write_bytes: float = 0
    masked_matmul_flops: float = 0

    def __add__(self, other: Cost) -> Cost:
        if not isinstance(other, Cost):
            return NotImplemented
        return Cost(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(Cost)))

    def __radd__(self, other: object) -> Cost:
        # sum() starts from 0
        if other == 0:
            return self
        return NotImplemented

    def __mul__(self, factor: float) -> Cost:
        if not isinstance(factor, (int, float)):
            return NotImplemented
        return Cost(*(getattr(self, f.name) * factor for f in fields(Cost)))

    __rmul__ = __mul__

    @property
    def flops(self) -> float:
        """Executed FLOPs: matmul (dense, causal masking not discounted) + other."""
        return self.matmul_flops + self.other_flops

    @property
    def useful_matmul_flops(self) -> float:
        """Matmul FLOPs whose results a causal mask keeps."""
        return self.matmul_flops - self.masked_matmul_flops

    @property
    def useful_flops(self) -> float:
        return self.useful_matmul_flops + self.other_flops

    @property
    def bytes(self) -> float:
        return (
            self.weight_bytes
            + self.act_read_bytes
            + self.act_write_bytes
            + self.kv_read_bytes
            + self.kv_write_bytes
        )

    def as_dict(self) -> dict[str, float]:
        """All fields plus the derived totals, for tables."""
        out = {f.name: getattr(self, f.name) for f in fields(Cost)}
        out.update(
            flops=self.flops,
            useful_matmul_flops=self.useful_matmul_flops,
            useful_flops=self.useful_flops,
            bytes=self.bytes,
        )
        return out


def _check(**dims: float) -> None:
    """Sizes must be non-negative numbers; a bad one is the caller's mistake."""
    for name, value in dims.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise UserError(f"shape: {name} must be a non-negative number, got {value!r}")


def _divides(total: int, part: int, what: str) -> int:
    if part <= 0 or total % part:
        raise UserError(f"shape: {what}: {total} is not a multiple of {part}")
    return total // part


def linear(tokens: float, in_features: int, out_features: int, dtype: object, *, bias: bool = True) -> Cost:
    """y = x W^T (+ b) over `tokens` rows.

    matmul = 2*T*in*out; other = T*out if bias; weights = (in*out + out*bias)*b;
    read T*in*b; write T*out*b.
    """
    _check(tokens=tokens, in_features=in_features, out_features=out_features)
    b = dtype_bytes(dtype)
    return Cost(
        matmul_flops=2 * tokens * in_features * out_features,
        other_flops=tokens * out_features if bias else 0,
        weight_bytes=(in_features * out_features + (out_features if bias else 0)) * b,
        act_read_bytes=tokens * in_features * b,
        act_write_bytes=tokens * out_features * b,
    )


def conv2d_out(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """Output side of a convolution: (size + 2*padding - kernel) // stride + 1."""
    _check(size=size, kernel=kernel, stride=stride, padding=padding)
    out = (size + 2 * padding - kernel) // stride + 1
    if kernel < 1 or stride < 1 or out < 1:
        raise UserError(f"shape: conv2d with kernel {kernel}, stride {stride} does not fit size {size}")
    return out


def conv2d(
    batch: int,
    in_channels: int,
    out_channels: int,
    size: int,
    kernel: int,
    dtype: object,
    *,
    stride: int = 1,
    padding: int = 0,
    bias: bool = False,
) -> Cost:
    """Square convolution of a [B, C_in, size, size] input, as an implicit GEMM.

    o = conv2d_out(size, kernel, stride, padding);
    matmul = 2*B*o^2*C_out*C_in*k^2; other = B*o^2*C_out if bias;
    weights = (C_out*C_in*k^2 + C_out*bias)*b; read B*C_in*size^2*b; write B*C_out*o^2*b.
    """
    _check(batch=batch, in_channels=in_channels, out_channels=out_channels)
    o = conv2d_out(size, kernel, stride, padding)
    b = dtype_bytes(dtype)
    outputs = batch * out_channels * o * o
    return Cost(
        matmul_flops=2 * outputs * in_channels * kernel * kernel,
        other_flops=outputs if bias else 0,
        weight_bytes=(out_channels * in_channels * kernel * kernel + (out_channels if bias else 0)) * b,
        act_read_bytes=batch * in_channels * size * size * b,
        act_write_bytes=outputs * b,
    )


def _elementwise(elements: float, flops_per_element: int, inputs: int, dtype: object) -> Cost:
    b = dtype_bytes(dtype)
    return Cost(
        other_flops=flops_per_element * elements,
        act_read_bytes=inputs * elements * b,
        act_write_bytes=elements * b,
    )


def layernorm(tokens: float, dim: int, dtype: object) -> Cost:
    """LayerNorm over the last `dim` of `tokens` rows, with weight and bias.

    other = 7*T*d; weights = 2*d*b; read T*d*b; write T*d*b.
    """
    _check(tokens=tokens, dim=dim)
    cost = _elementwise(tokens * dim, LAYERNORM_FLOPS, 1, dtype)
    return replace(cost, weight_bytes=2 * dim * dtype_bytes(dtype))


def layernorm2d(batch: int, channels: int, size: int, dtype: object) -> Cost:
    """LayerNorm over the channels of a [B, C, size, size] map: layernorm(B*size^2, C)."""
    _check(batch=batch, size=size)
    return layernorm(batch * size * size, channels, dtype)


def rmsnorm(tokens: float, dim: int, dtype: object) -> Cost:
    """RMSNorm (fp32 inside, weight only) over `tokens` rows.

    other = 4*T*d; weights = d*b; read T*d*b; write T*d*b.
    """
    _check(tokens=tokens, dim=dim)
    return replace(_elementwise(tokens * dim, RMSNORM_FLOPS, 1, dtype), weight_bytes=dim * dtype_bytes(dtype))


def embedding(tokens: float, dim: int, dtype: object) -> Cost:
    """Embedding lookup of `tokens` ids: only the gathered rows of the table are read.

    FLOPs 0; weights = T*d*b; read T*8 (int64 ids); write T*d*b.
    """
    _check(tokens=tokens, dim=dim)
    b = dtype_bytes(dtype)
    return Cost(
        weight_bytes=tokens * dim * b, act_read_bytes=tokens * INDEX_BYTES, act_write_bytes=tokens * dim * b
    )


def add(elements: float, dtype: object) -> Cost:
    """Elementwise sum of two tensors (residuals, position embeddings): other = n; read 2n*b; write n*b."""
    _check(elements=elements)
    return _elementwise(elements, 1, 2, dtype)


def gelu(elements: float, dtype: object) -> Cost:
    """Exact (erf) GELU: other = 5n; read n*b; write n*b."""
    _check(elements=elements)
    return _elementwise(elements, GELU_FLOPS, 1, dtype)


def quick_gelu(elements: float, dtype: object) -> Cost:
    """x * sigmoid(1.702 x): other = 6n; read n*b; write n*b."""
    _check(elements=elements)
    return _elementwise(elements, QUICK_GELU_FLOPS, 1, dtype)


def silu_gated(elements: float, dtype: object) -> Cost:
    """silu(gate) * up, n output elements: other = 6n; read 2n*b; write n*b."""
    _check(elements=elements)
    return _elementwise(elements, SILU_GATED_FLOPS, 2, dtype)


def attention_core(
    groups: float,
    heads: int,
    q_len: float,
    kv_len: float,
    head_dim: int,
    dtype: object,
    *,
    mask: bool = False,
    kv_from_cache: bool = False,
) -> Cost:
    """One fused scaled-dot-product attention call on [groups, heads, q_len|kv_len, head_dim].

    matmul = 4*G*H*Lq*Lk*D (QK^T and PV); other = 5*G*H*Lq*Lk (softmax) + G*H*Lq*Lk if an
    additive mask is added; read Q (G*H*Lq*D*b), K and V (2*G*H*Lk*D*b, counted as KV-cache
    reads when they come from a cache) and the mask (G*H*Lq*Lk*b); write G*H*Lq*D*b.
    """
    _check(groups=groups, heads=heads, q_len=q_len, kv_len=kv_len, head_dim=head_dim)
    b = dtype_bytes(dtype)
    scores = groups * heads * q_len * kv_len
    kv = 2 * groups * heads * kv_len * head_dim * b
    q_bytes = groups * heads * q_len * head_dim * b
    return Cost(
        matmul_flops=4 * scores * head_dim,
        other_flops=SOFTMAX_FLOPS * scores + (scores if mask else 0),
        act_read_bytes=q_bytes + (0 if kv_from_cache else kv) + (scores * b if mask else 0),
        kv_read_bytes=kv if kv_from_cache else 0,
        act_write_bytes=q_bytes,
    )


def sam_attention(batch: int, grid: int, width: int, heads: int, dtype: object, *, window: int = 0) -> Cost:
    """SAM ViT attention with decomposed relative-position bias over a [B, grid, grid, width] map.

    Windowed (window > 0): the normed map is zero-padded to gp = ceil(grid/window)*window and
    cut into nw = (gp/window)^2 windows of L = window^2 tokens; padded tokens are keys too.
    Global (window = 0): gp = grid, nw = 1, L = grid^2. With G = B*nw, Np = B*gp^2, D = width/heads,
    k = sqrt(L) (rows = cols of the attended grid):
      qkv  = linear(Np, width, 3*width, bias);  proj = linear(Np, width, width, bias)
      rel  : rel_h, rel_w = einsum(q, R): matmul 2 * 2*G*H*L*k*D; tables 2*(2k-1)*D*b;
             read q twice, write 2*G*H*L*k*b
      bias : rel_h[..., None] + rel_w[..., None, :] -> [G*H, L, L]: other G*H*L^2, write G*H*L^2*b
      core : attention_core(G, H, L, L, D, mask=True)
    """
    _check(batch=batch, grid=grid, width=width, heads=heads, window=window)
    head_dim = _divides(width, heads, "sam width / heads")
    b = dtype_bytes(dtype)
    side = window if window else grid
    padded = math.ceil(grid / side) * side
    groups = batch * (padded // side) ** 2
    seq = side * side
    tokens = batch * padded * padded
    scores = groups * heads * seq * seq
    rel = Cost(
        matmul_flops=2 * 2 * groups * heads * seq * side * head_dim,
        weight_bytes=2 * (2 * side - 1) * head_dim * b,
        act_read_bytes=2 * tokens * width * b,
        act_write_bytes=2 * groups * heads * seq * side * b,
    )
    bias = Cost(
        other_flops=scores,
        act_read_bytes=2 * groups * heads * seq * side * b,
        act_write_bytes=scores * b,
    )
    return (
        linear(tokens, width, 3 * width, dtype)
        + rel
        + bias
        + attention_core(groups, heads, seq, seq, head_dim, dtype, mask=True)
        + linear(tokens, width, width, dtype)
    )


def clip_attention(batch: int, tokens: int, width: int, heads: int, dtype: object) -> Cost:
    """CLIP ViT self-attention over [B, T, width], bidirectional, no mask.

    qkv = linear(B*T, w, 3w, bias); core = attention_core(B, H, T, T, w/H); out = linear(B*T, w, w, bias).
    matmul = 2*B*T*w*3w + 4*B*T^2*w + 2*B*T*w^2.
    """
    _check(batch=batch, tokens=tokens, width=width, heads=heads)
    head_dim = _divides(width, heads, "clip width / heads")
    rows = batch * tokens
    return (
        linear(rows, width, 3 * width, dtype)
        + attention_core(batch, heads, tokens, tokens, head_dim, dtype)
        + linear(rows, width, width, dtype)
    )


def causal_attention(new_tokens: float, cached_tokens: float, hidden: int, heads: int, dtype: object) -> Cost:
    """Causal multi-head self-attention of `new_tokens` queries after `cached_tokens` cached ones.

    Prefill of S tokens: (S, 0). Decode of one token against a cache of length L: (1, L).
    With n = new, c = cached, K = c + n keys, h = hidden (= heads*D):
      q,k,v,o = 4 * linear(n, h, h, no bias)       -> 8*n*h^2
      RoPE on q and k                               other 3*2*n*h
      K/V appended to the cache                     kv_write 2*n*h*b
      core: attention_core(1, H, n, K, D) reading K/V from the cache
            executed (dense)  4*n*K*h
            useful  (causal)  4*h*(n*c + n(n+1)/2)  -> masked = executed - useful
    Decode (n = 1) has nothing masked: executed = useful = 4*h*(L+1).
    """
    _check(new_tokens=new_tokens, cached_tokens=cached_tokens, hidden=hidden, heads=heads)
    head_dim = _divides(hidden, heads, "lm hidden / heads")
    b = dtype_bytes(dtype)
    keys = cached_tokens + new_tokens
    core = attention_core(1, heads, new_tokens, keys, head_dim, dtype, kv_from_cache=True)
    useful = 4 * hidden * (new_tokens * cached_tokens + new_tokens * (new_tokens + 1) / 2)
    rope = Cost(
        other_flops=ROPE_FLOPS * 2 * new_tokens * hidden,
        act_read_bytes=2 * new_tokens * hidden * b,
        act_write_bytes=2 * new_tokens * hidden * b,
    )
    return (
        4 * linear(new_tokens, hidden, hidden, dtype, bias=False)
        + rope
        + Cost(kv_write_bytes=2 * new_tokens * hidden * b)
        + replace(core, masked_matmul_flops=core.matmul_flops - useful)
    )


def swiglu_mlp(tokens: float, hidden: int, intermediate: int, dtype: object) -> Cost:
    """down(silu(gate(x)) * up(x)), bias-free.

    matmul = 6*T*h*I; other = 6*T*I; weights = 3*h*I*b; gate and up each read x.
    """
    _check(tokens=tokens, hidden=hidden, intermediate=intermediate)
    return (
        2 * linear(tokens, hidden, intermediate, dtype, bias=False)
        + silu_gated(tokens * intermediate, dtype)
        + linear(tokens, intermediate, hidden, dtype, bias=False)
    )


def expected_distinct_experts(tokens: float, n_experts: int, top_k: int) -> float:
    """Expected number of experts hit by at least one of T tokens, each routed to k distinct
    experts of E uniformly at random: E * (1 - (1 - k/E)^T)."""
    _check(tokens=tokens, n_experts=n_experts, top_k=top_k)
    if not 0 < top_k <= n_experts:
        raise UserError(f"moe: top_k must be in 1..{n_experts}, got {top_k}")
    return n_experts * (1 - (1 - top_k / n_experts) ** tokens)


def moe_parts(
    tokens: float,
    hidden: int,
    expert_intermediate: int,
    n_experts: int,
    top_k: int,
    shared_intermediate: int,
    dtype: object,
    *,
    experts_touched: float | None = None,
) -> dict[str, Cost]:
    """DeepSeek-V2 MoE over T tokens, split into its "gate", "routed" and "shared" parts.

    gate:   fp32 F.linear(x.float(), W.float()) -> matmul 2*T*h*E; softmax other 5*T*E;
            weights E*h*b; the fp32 copies of x and W are written, then read.
    routed: T*k token-expert pairs through bias-free SwiGLU experts of width I:
            matmul 6*T*k*h*I; weights read only for the experts touched: X*3*h*I*b, X given
            or expected_distinct_experts(T, E, k); weighting and summing the k outputs other 2*T*k*h.
    shared: swiglu_mlp(T, h, I_shared) over all tokens, its output added to the routed sum.
    """
    _check(tokens=tokens, expert_intermediate=expert_intermediate, shared_intermediate=shared_intermediate)
    touched = experts_touched
    if touched is None:
        touched = expected_distinct_experts(tokens, n_experts, top_k)
    _check(experts_touched=touched)
    if touched > min(n_experts, tokens * top_k):
        limit = min(n_experts, tokens * top_k)
        raise UserError(f"moe: {touched} experts touched, more than min(E, T*k) = {limit}")
    b = dtype_bytes(dtype)
    fp32 = 4
    pairs = tokens * top_k
    copies = (tokens + n_experts) * hidden * fp32
    logits = tokens * n_experts * fp32
    gate = Cost(
        matmul_flops=2 * tokens * hidden * n_experts,
        other_flops=SOFTMAX_FLOPS * tokens * n_experts,
        weight_bytes=n_experts * hidden * b,
        # fp32 copies of x and W (written, then read by the matmul), logits and probabilities
        act_read_bytes=tokens * hidden * b + copies + 2 * logits,
        act_write_bytes=copies + 2 * logits,
    )
    experts = swiglu_mlp(pairs, hidden, expert_intermediate, dtype)
    combine = Cost(
        other_flops=2 * pairs * hidden, act_read_bytes=pairs * hidden * b, act_write_bytes=tokens * hidden * b
    )
    routed = replace(experts, weight_bytes=touched * 3 * hidden * expert_intermediate * b) + combine
    shared = swiglu_mlp(tokens, hidden, shared_intermediate, dtype) + add(tokens * hidden, dtype)
    return {"gate": gate, "routed": routed, "shared": shared}


def moe(
    tokens: float,
    hidden: int,
    expert_intermediate: int,
    n_experts: int,
    top_k: int,
    shared_intermediate: int,
    dtype: object,
    *,
    experts_touched: float | None = None,
) -> Cost:
    """The whole MoE block: sum of moe_parts (gate + routed experts + shared experts)."""
    parts = moe_parts(
        tokens,
        hidden,
        expert_intermediate,
        n_experts,
        top_k,
        shared_intermediate,
        dtype,
        experts_touched=experts_touched,
    )
    return sum(parts.values(), Cost())


def lm_head(
    tokens: float, hidden: int, vocab: int, dtype: object, *, logits_dtype: object = "float32"
) -> Cost:
    """Output projection to the vocabulary, then the cast of the logits (fp32 by default).

    matmul = 2*T*h*V; weights = V*h*b; plus the cast: read T*V*b, write T*V*b_logits.
    """
    _check(tokens=tokens, hidden=hidden, vocab=vocab)
    b = dtype_bytes(dtype)
    cast = Cost(act_read_bytes=tokens * vocab * b, act_write_bytes=tokens * vocab * dtype_bytes(logits_dtype))
    return linear(tokens, hidden, vocab, dtype, bias=False) + cast
