"""Analytic cost of one call of each model-independent module family, from shapes and a dtype
alone: the cost algebra (`Cost`) and the primitives models build their stages from (linear,
convolution, norms, attention core, causal attention, RoPE, SwiGLU, lm_head, the expected
experts of uniform MoE routing). A model's own families live with it (`models/<m>/analytic/`).

Conventions shared by every function here:

* FLOPs: 2 per multiply-add. `matmul_flops` is the work of matrix products and convolutions
  (what `torch.utils.flop_counter.FlopCounterMode` counts: mm, addmm, bmm, convolution,
  attention). `other_flops` is elementwise and reduction work, one FLOP per arithmetic
  operation or transcendental per element; the per-element constants are below. Bias adds
  are other FLOPs (FlopCounterMode counts addmm as its matmul only).
* Bytes: the sum over the family's aten ops of each operand read once and each result written
  once, as eager PyTorch runs this implementation (no reuse between kernels, no cache
  effects), op for op: the fp32 internals of RMSNorm and the MoE router, the copies that
  reshapes of non-contiguous tensors make, the small index tensors. Views are free. A
  broadcast operand is read once. Attention is one fused kernel that never writes its score
  matrix; an additive mask it is given is materialised and read. Weights are read once per
  call, in the call's dtype. `analytic.validate --bytes` checks every stage against the bytes
  a dispatch mode counts on the meta-device model (analytic/byte_count.py).
* Casts: `x.float()` / `.to(dtype)` copy only when the dtype changes, so in a float32 model
  the fp32 internals cost nothing extra. FP32 = 4 bytes; int64 indices INDEX_BYTES = 8.
* `kv_write_bytes` are K/V rows appended to a cache; `kv_read_bytes` are K/V rows an
  attention kernel reads from it (the rows just appended included).
* `masked_matmul_flops` and `masked_other_flops` are the parts of `matmul_flops` and
  `other_flops` (the softmax) that a causal mask discards: a dense kernel executes them, a
  causal kernel that skips masked tiles does not.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from llm_perf_opt.models.interface import Work

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
INDEX_BYTES = 8  # token ids, expert ids, gather indices are int64
FP32 = 4
BOOL_BYTES = 1


def dtype_bytes(dtype: object) -> int:
    """Bytes per element of a torch dtype or of its name ("bfloat16", "torch.float16", "bf16")."""
    if not isinstance(dtype, str):
        itemsize = getattr(dtype, "itemsize", None)  # torch.dtype
        if isinstance(itemsize, int):
            return itemsize
    name = str(dtype).removeprefix("torch.").lower()
    if name not in _DTYPE_BYTES:
        raise ValueError(f"dtype: unknown dtype {dtype!r}; use e.g. 'bfloat16', 'float16' or 'float32'")
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
    masked_other_flops: float = 0

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
    def useful_other_flops(self) -> float:
        """Other FLOPs on results a causal mask keeps (the softmax over the masked scores is not)."""
        return self.other_flops - self.masked_other_flops

    @property
    def useful_flops(self) -> float:
        return self.useful_matmul_flops + self.useful_other_flops

    @property
    def bytes(self) -> float:
        return (
            self.weight_bytes
            + self.act_read_bytes
            + self.act_write_bytes
            + self.kv_read_bytes
            + self.kv_write_bytes
        )

    def work(self) -> Work:
        """The figures the harness reads (executed and useful FLOPs, bytes by category)."""
        return Work(
            matmul_flops=self.matmul_flops,
            useful_matmul_flops=self.useful_matmul_flops,
            other_flops=self.other_flops,
            useful_other_flops=self.useful_other_flops,
            weight_bytes=self.weight_bytes,
            act_read_bytes=self.act_read_bytes,
            act_write_bytes=self.act_write_bytes,
            kv_read_bytes=self.kv_read_bytes,
            kv_write_bytes=self.kv_write_bytes,
        )

    def as_dict(self) -> dict[str, float]:
        """All fields plus the derived totals, for tables."""
        out = {f.name: getattr(self, f.name) for f in fields(Cost)}
        out.update(
            flops=self.flops,
            useful_matmul_flops=self.useful_matmul_flops,
            useful_other_flops=self.useful_other_flops,
            useful_flops=self.useful_flops,
            bytes=self.bytes,
        )
        return out


def check_sizes(**dims: float) -> None:
    """Sizes must be non-negative numbers; a bad one is a bug in the caller."""
    for name, value in dims.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"shape: {name} must be a non-negative number, got {value!r}")


def divides(total: int, part: int, what: str) -> int:
    if part <= 0 or total % part:
        raise ValueError(f"shape: {what}: {total} is not a multiple of {part}")
    return total // part


def linear(tokens: float, in_features: int, out_features: int, dtype: object, *, bias: bool = True) -> Cost:
    """y = x W^T (+ b) over `tokens` rows.

    matmul = 2*T*in*out; other = T*out if bias; weights = (in*out + out*bias)*b;
    read T*in*b; write T*out*b.
    """
    check_sizes(tokens=tokens, in_features=in_features, out_features=out_features)
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
    check_sizes(size=size, kernel=kernel, stride=stride, padding=padding)
    out = (size + 2 * padding - kernel) // stride + 1
    if kernel < 1 or stride < 1 or out < 1:
        raise ValueError(f"shape: conv2d with kernel {kernel}, stride {stride} does not fit size {size}")
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
    check_sizes(batch=batch, in_channels=in_channels, out_channels=out_channels)
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


def flops_only(cost: Cost) -> Cost:
    """The FLOP fields of `cost` alone."""
    return Cost(
        matmul_flops=cost.matmul_flops,
        other_flops=cost.other_flops,
        masked_matmul_flops=cost.masked_matmul_flops,
        masked_other_flops=cost.masked_other_flops,
    )


def bytes_only(cost: Cost) -> Cost:
    """The byte fields of `cost` alone."""
    return replace(cost, matmul_flops=0, other_flops=0, masked_matmul_flops=0, masked_other_flops=0)


def cast(elements: float, src: int, dst: int) -> Cost:
    """x.to(dtype) between float dtypes of `src` and `dst` bytes: a copy, or nothing when the
    dtype does not change (float types of equal size are taken as the same type)."""
    if src == dst:
        return Cost()
    return Cost(act_read_bytes=elements * src, act_write_bytes=elements * dst)


def layernorm(tokens: float, dim: int, dtype: object) -> Cost:
    """LayerNorm over the last `dim` of `tokens` rows, with weight and bias (one native_layer_norm).

    other = 7*T*d; weights = 2*d*b; read T*d*b; write T*d*b plus the per-row mean and rstd the
    op also returns, in fp32 (2*T*4; fp64 for an fp64 input) as on CUDA and meta (the CPU
    kernel returns them in a bf16 input's dtype, 2*T*2 bytes less per call).
    """
    check_sizes(tokens=tokens, dim=dim)
    b = dtype_bytes(dtype)
    cost = _elementwise(tokens * dim, LAYERNORM_FLOPS, 1, dtype)
    return cost + Cost(weight_bytes=2 * dim * b, act_write_bytes=2 * tokens * max(b, FP32))


def layernorm2d(batch: int, channels: int, size: int, dtype: object) -> Cost:
    """LayerNorm over the channels of a [B, C, size, size] map, written out elementwise.

    With E = B*C*size^2 elements and N = B*size^2 positions, the ops
    mean(E->N), x-mean (E+N->E), pow (E->E), mean (E->N), +eps (N->N), sqrt (N->N),
    x-mean again (E+N->E), divide (E+N->E), *weight (E->E), +bias (E->E)
    read (8E + 5N)*b and write (6E + 4N)*b; weights 2*C*b; other = 7*E.
    """
    check_sizes(batch=batch, channels=channels, size=size)
    b = dtype_bytes(dtype)
    positions = batch * size * size
    elements = positions * channels
    return Cost(
        other_flops=LAYERNORM_FLOPS * elements,
        weight_bytes=2 * channels * b,
        act_read_bytes=(8 * elements + 5 * positions) * b,
        act_write_bytes=(6 * elements + 4 * positions) * b,
    )


def rmsnorm(tokens: float, dim: int, dtype: object) -> Cost:
    """RMSNorm over `tokens` rows: variance and scaling in fp32, cast back, then the weight.

    With n = T*d: cast to fp32 (n*b -> 4n), pow (4n -> 4n), mean (4n -> 4T), +eps and rsqrt
    (4T -> 4T each), x*rstd (4n + 4T -> 4n), cast back (4n -> n*b), weight * x (n*b + d*b -> n*b);
    the casts vanish in fp32. other = 4n; weights = d*b.
    """
    check_sizes(tokens=tokens, dim=dim)
    b = dtype_bytes(dtype)
    n = tokens * dim
    fp32 = Cost(act_read_bytes=FP32 * (3 * n + 3 * tokens), act_write_bytes=FP32 * (2 * n + 3 * tokens))
    scale = Cost(weight_bytes=dim * b, act_read_bytes=n * b, act_write_bytes=n * b)
    return replace(cast(n, b, FP32) + fp32 + cast(n, FP32, b) + scale, other_flops=RMSNORM_FLOPS * n)


def embedding(tokens: float, dim: int, dtype: object) -> Cost:
    """Embedding lookup of `tokens` ids: only the gathered rows of the table are read.

    FLOPs 0; weights = T*d*b; read T*8 (int64 ids); write T*d*b.
    """
    check_sizes(tokens=tokens, dim=dim)
    b = dtype_bytes(dtype)
    return Cost(
        weight_bytes=tokens * dim * b, act_read_bytes=tokens * INDEX_BYTES, act_write_bytes=tokens * dim * b
    )


def add(elements: float, dtype: object) -> Cost:
    """Elementwise sum of two tensors (residuals, position embeddings): other = n; read 2n*b; write n*b."""
    check_sizes(elements=elements)
    return _elementwise(elements, 1, 2, dtype)


def gelu(elements: float, dtype: object) -> Cost:
    """Exact (erf) GELU: other = 5n; read n*b; write n*b."""
    check_sizes(elements=elements)
    return _elementwise(elements, GELU_FLOPS, 1, dtype)


def quick_gelu(elements: float, dtype: object) -> Cost:
    """x * sigmoid(1.702 x) as three ops (scale, sigmoid, multiply): other = 6n; read 4n*b; write 3n*b."""
    check_sizes(elements=elements)
    b = dtype_bytes(dtype)
    n = elements
    return Cost(other_flops=QUICK_GELU_FLOPS * n, act_read_bytes=4 * n * b, act_write_bytes=3 * n * b)


def silu_gated(elements: float, dtype: object) -> Cost:
    """silu(gate) * up as two ops, n output elements: other = 6n; read 3n*b; write 2n*b."""
    check_sizes(elements=elements)
    b = dtype_bytes(dtype)
    n = elements
    return Cost(other_flops=SILU_GATED_FLOPS * n, act_read_bytes=3 * n * b, act_write_bytes=2 * n * b)


def concat(elements: float, dtype: object) -> Cost:
    """torch.cat of tensors holding n elements in all: read n*b, write n*b."""
    check_sizes(elements=elements)
    b = dtype_bytes(dtype)
    return Cost(act_read_bytes=elements * b, act_write_bytes=elements * b)


def resized_table(src_elements: float, dst_elements: float, dtype: object) -> Cost:
    """A parameter table interpolated to another size in fp32: cast to fp32, interpolate, cast back.

    weights src*b (the table is read once); casts src*b -> src*4 and dst*4 -> dst*b (none in
    fp32, where the interpolation reads the parameter itself); interpolation src*4 -> dst*4.
    Interpolation FLOPs are not counted (a few per output element, negligible).
    """
    check_sizes(src_elements=src_elements, dst_elements=dst_elements)
    b = dtype_bytes(dtype)
    if b == FP32:
        return Cost(weight_bytes=src_elements * b, act_write_bytes=dst_elements * FP32)
    return Cost(
        weight_bytes=src_elements * b,
        act_read_bytes=(src_elements + dst_elements) * FP32,
        act_write_bytes=(src_elements + dst_elements) * FP32 + dst_elements * b,
    )


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
    kv_heads: int | None = None,
) -> Cost:
    """One fused scaled-dot-product attention call on [groups, heads, q_len|kv_len, head_dim].

    matmul = 4*G*H*Lq*Lk*D (QK^T and PV); other = 5*G*H*Lq*Lk (softmax) + G*H*Lq*Lk if an
    additive mask is added; read Q (G*H*Lq*D*b), K and V (2*G*Hkv*Lk*D*b, counted as KV-cache
    reads when they come from a cache) and the mask (G*H*Lq*Lk*b); write G*H*Lq*D*b. With
    grouped-query attention Hkv = `kv_heads` < H query heads share each K/V head (the FLOPs are
    per query head; K and V are read once per K/V head); by default Hkv = H.
    """
    check_sizes(groups=groups, heads=heads, q_len=q_len, kv_len=kv_len, head_dim=head_dim)
    kv_heads = heads if kv_heads is None else kv_heads
    divides(heads, kv_heads, "query heads / K/V heads")
    b = dtype_bytes(dtype)
    scores = groups * heads * q_len * kv_len
    kv = 2 * groups * kv_heads * kv_len * head_dim * b
    q_bytes = groups * heads * q_len * head_dim * b
    return Cost(
        matmul_flops=4 * scores * head_dim,
        other_flops=SOFTMAX_FLOPS * scores + (scores if mask else 0),
        act_read_bytes=q_bytes + (0 if kv_from_cache else kv) + (scores * b if mask else 0),
        kv_read_bytes=kv if kv_from_cache else 0,
        act_write_bytes=q_bytes,
    )


def rope(tokens: float, hidden: int, head_dim: int, dtype: object, *, batch: int = 1) -> Cost:
    """Rotary embedding of one [B, T, H, D] tensor (n = B*T*hidden elements) with [T, D] cos/sin
    tables shared by the batch.

    x * cos + cat(-x2, x1) * sin as eager ops: neg (n/2 -> n/2), cat (n -> n), two multiplies
    (n + T*D -> n each), add (2n -> n): read (5.5n + 2*T*D)*b, write 4.5n*b; other = 3n.
    """
    check_sizes(tokens=tokens, hidden=hidden, head_dim=head_dim, batch=batch)
    b = dtype_bytes(dtype)
    n = batch * tokens * hidden
    table = tokens * head_dim
    return Cost(
        other_flops=ROPE_FLOPS * n, act_read_bytes=(5.5 * n + 2 * table) * b, act_write_bytes=4.5 * n * b
    )


def rope_tables(tokens: float, head_dim: int, dtype: object, *, positions_given: bool = False) -> Cost:
    """cos and sin [T, D] of T positions, computed in fp32 once per forward, cast to the dtype.

    Inverse frequencies over D/2 (arange, cast, divide, power, reciprocal, multiply: read 14D,
    write 14D bytes with the int64 arange), positions (arange 8T, cast 8T -> 4T), their outer
    product (4T + 2D -> 2TD), cat (4TD -> 4TD), cos and sin (4TD -> 4TD each) and the two casts
    (4TD -> TD*b each, none in fp32): read 12T + 14D + 12TD (+ 8TD), write 12T + 14D + 14TD (+ 2TD*b).
    With `positions_given` (a positioned decode step reads them from a buffer) the positions'
    arange is not written: 8T fewer bytes written.
    FLOPs are not counted (per position and frequency, not per hidden element).
    """
    check_sizes(tokens=tokens, head_dim=head_dim)
    b = dtype_bytes(dtype)
    t, d = tokens, head_dim
    arange = 0 if positions_given else 8 * t
    tables = Cost(
        act_read_bytes=12 * t + 14 * d + 12 * t * d, act_write_bytes=arange + 4 * t + 14 * d + 14 * t * d
    )
    return tables + 2 * cast(t * d, FP32, b)


def causal_attention(
    new_tokens: float,
    cached_tokens: float,
    hidden: int,
    heads: int,
    dtype: object,
    *,
    static_len: int | None = None,
    batch: int = 1,
    kv_heads: int | None = None,
) -> Cost:
    """Causal multi-head self-attention of `new_tokens` queries after `cached_tokens` cached ones,
    in each of `batch` sequences (the projections read their weights once for the batch).

    Prefill of S tokens: (S, 0). Decode of one token against a cache of length L: (1, L).
    With n = new, c = cached, K = c + n keys, h = hidden (= heads*D):
      q,k,v,o = 4 * linear(n, h, h, no bias)       -> 8*n*h^2
      RoPE on q and k                               rope(n, h, D) each
      K/V copied into the cache                     read 2*n*h*b, kv_write 2*n*h*b
      core: attention_core(1, H, n, K, D) reading K/V from the cache
            executed (dense)  4*n*K*h matmul, 5*H*n*K softmax
            useful  (causal)  4*h*u matmul, 5*H*u softmax, with u = n*c + n(n+1)/2 kept scores
            per head -> masked = executed - useful, for both
    Decode (n = 1) has nothing masked: executed = useful = 4*h*(L+1).
    A positioned decode step over a static cache of `static_len` = M positions (the fast
    decode) writes K and V with index_copy_ (also reading its int64 index, 8 bytes each) and
    attends over all M positions through a [1, M] bool mask: K/V read 2*M*h*b, mask read M.
    FLOPs stay those of the L+1 visible keys (the useful work).
    A batch of B sequences: the projections are linear(B*n, ...), RoPE, the cache writes and the
    core scale with B, and the core is attention_core(B, ...).
    Grouped-query attention (`kv_heads` = Hkv < H): k and v project to Hkv*D = h_kv features,
    RoPE on k and the cache's K/V reads and writes are over h_kv (2*n*h_kv*b written per
    sequence); by default h_kv = h.
    """
    check_sizes(new_tokens=new_tokens, cached_tokens=cached_tokens, hidden=hidden, heads=heads, batch=batch)
    head_dim = divides(hidden, heads, "lm hidden / heads")
    kv_hidden = hidden if kv_heads is None else kv_heads * head_dim
    b = dtype_bytes(dtype)
    keys = cached_tokens + new_tokens
    core = attention_core(
        batch, heads, new_tokens, keys, head_dim, dtype, kv_from_cache=True, kv_heads=kv_heads
    )
    kept = new_tokens * cached_tokens + new_tokens * (new_tokens + 1) / 2  # scores per head
    masked = batch * heads * (new_tokens * keys - kept)
    rows = batch * new_tokens
    append = Cost(act_read_bytes=2 * rows * kv_hidden * b, kv_write_bytes=2 * rows * kv_hidden * b)
    if static_len is not None:
        if new_tokens != 1 or static_len < keys:
            raise ValueError(
                f"attention: a static step feeds 1 token into {keys} <= static_len, not {static_len}"
            )
        core = replace(core, kv_read_bytes=2 * batch * static_len * kv_hidden * b)
        core += Cost(act_read_bytes=static_len * BOOL_BYTES + 2 * INDEX_BYTES)
    return (
        2 * linear(rows, hidden, hidden, dtype, bias=False)
        + 2 * linear(rows, hidden, kv_hidden, dtype, bias=False)
        + rope(new_tokens, hidden, head_dim, dtype, batch=batch)
        + rope(new_tokens, kv_hidden, head_dim, dtype, batch=batch)
        + append
        + replace(core, masked_matmul_flops=4 * masked * head_dim, masked_other_flops=SOFTMAX_FLOPS * masked)
    )


def swiglu_mlp(tokens: float, hidden: int, intermediate: int, dtype: object) -> Cost:
    """down(silu(gate(x)) * up(x)), bias-free.

    matmul = 6*T*h*I; other = 6*T*I; weights = 3*h*I*b; gate and up each read x.
    """
    check_sizes(tokens=tokens, hidden=hidden, intermediate=intermediate)
    return (
        2 * linear(tokens, hidden, intermediate, dtype, bias=False)
        + silu_gated(tokens * intermediate, dtype)
        + linear(tokens, intermediate, hidden, dtype, bias=False)
    )


def expected_distinct_experts(tokens: float, n_experts: int, top_k: int) -> float:
    """Expected number of experts hit by at least one of T tokens, each routed to k distinct
    experts of E uniformly at random: E * (1 - (1 - k/E)^T)."""
    check_sizes(tokens=tokens, n_experts=n_experts, top_k=top_k)
    if not 0 < top_k <= n_experts:
        raise ValueError(f"moe: top_k must be in 1..{n_experts}, got {top_k}")
    return n_experts * (1 - (1 - top_k / n_experts) ** tokens)


def lm_head(
    tokens: float, hidden: int, vocab: int, dtype: object, *, logits_dtype: object = "float32"
) -> Cost:
    """Output projection to the vocabulary, then the cast of the logits (fp32 by default).

    matmul = 2*T*h*V; weights = V*h*b; plus the cast: read T*V*b, write T*V*b_logits (none
    when the model already computes in the logits' dtype).
    """
    check_sizes(tokens=tokens, hidden=hidden, vocab=vocab)
    b = dtype_bytes(dtype)
    logits = cast(tokens * vocab, b, dtype_bytes(logits_dtype))
    return linear(tokens, hidden, vocab, dtype, bias=False) + logits
