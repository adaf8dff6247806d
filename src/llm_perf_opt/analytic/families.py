"""Analytic cost of one call of each module family, from shapes and a dtype alone.

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

import math
from dataclasses import dataclass, fields, replace

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


def _check(**dims: float) -> None:
    """Sizes must be non-negative numbers; a bad one is a bug in the caller."""
    for name, value in dims.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"shape: {name} must be a non-negative number, got {value!r}")


def _divides(total: int, part: int, what: str) -> int:
    if part <= 0 or total % part:
        raise ValueError(f"shape: {what}: {total} is not a multiple of {part}")
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


def _flops(cost: Cost) -> Cost:
    """The FLOP fields of `cost` alone."""
    return Cost(
        matmul_flops=cost.matmul_flops,
        other_flops=cost.other_flops,
        masked_matmul_flops=cost.masked_matmul_flops,
        masked_other_flops=cost.masked_other_flops,
    )


def _bytes(cost: Cost) -> Cost:
    """The byte fields of `cost` alone."""
    return replace(cost, matmul_flops=0, other_flops=0, masked_matmul_flops=0, masked_other_flops=0)


def _cast(elements: float, src: int, dst: int) -> Cost:
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
    _check(tokens=tokens, dim=dim)
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
    _check(batch=batch, channels=channels, size=size)
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
    _check(tokens=tokens, dim=dim)
    b = dtype_bytes(dtype)
    n = tokens * dim
    fp32 = Cost(act_read_bytes=FP32 * (3 * n + 3 * tokens), act_write_bytes=FP32 * (2 * n + 3 * tokens))
    scale = Cost(weight_bytes=dim * b, act_read_bytes=n * b, act_write_bytes=n * b)
    return replace(_cast(n, b, FP32) + fp32 + _cast(n, FP32, b) + scale, other_flops=RMSNORM_FLOPS * n)


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
    """x * sigmoid(1.702 x) as three ops (scale, sigmoid, multiply): other = 6n; read 4n*b; write 3n*b."""
    _check(elements=elements)
    b = dtype_bytes(dtype)
    n = elements
    return Cost(other_flops=QUICK_GELU_FLOPS * n, act_read_bytes=4 * n * b, act_write_bytes=3 * n * b)


def silu_gated(elements: float, dtype: object) -> Cost:
    """silu(gate) * up as two ops, n output elements: other = 6n; read 3n*b; write 2n*b."""
    _check(elements=elements)
    b = dtype_bytes(dtype)
    n = elements
    return Cost(other_flops=SILU_GATED_FLOPS * n, act_read_bytes=3 * n * b, act_write_bytes=2 * n * b)


def concat(elements: float, dtype: object) -> Cost:
    """torch.cat of tensors holding n elements in all: read n*b, write n*b."""
    _check(elements=elements)
    b = dtype_bytes(dtype)
    return Cost(act_read_bytes=elements * b, act_write_bytes=elements * b)


def resized_table(src_elements: float, dst_elements: float, dtype: object) -> Cost:
    """A parameter table interpolated to another size in fp32: cast to fp32, interpolate, cast back.

    weights src*b (the table is read once); casts src*b -> src*4 and dst*4 -> dst*b (none in
    fp32, where the interpolation reads the parameter itself); interpolation src*4 -> dst*4.
    Interpolation FLOPs are not counted (a few per output element, negligible).
    """
    _check(src_elements=src_elements, dst_elements=dst_elements)
    b = dtype_bytes(dtype)
    if b == FP32:
        return Cost(weight_bytes=src_elements * b, act_write_bytes=dst_elements * FP32)
    return Cost(
        weight_bytes=src_elements * b,
        act_read_bytes=(src_elements + dst_elements) * FP32,
        act_write_bytes=(src_elements + dst_elements) * FP32 + dst_elements * b,
    )


def sam_pos_embed(batch: int, grid: int, table_grid: int, width: int, dtype: object) -> Cost:
    """x + pos over a [B, g, g, C] map, the table of table_grid^2 positions resized if g differs.

    g == table_grid: read B*g^2*C*b and the table g^2*C*b (a weight), write B*g^2*C*b.
    otherwise: resized_table(P^2*C -> g^2*C), then the add reads the resized g^2*C*b.
    other = B*g^2*C.
    """
    _check(batch=batch, grid=grid, table_grid=table_grid, width=width)
    b = dtype_bytes(dtype)
    n = batch * grid * grid * width
    table = grid * grid * width
    out = Cost(other_flops=n, act_read_bytes=n * b, act_write_bytes=n * b)
    if grid == table_grid:
        return out + Cost(weight_bytes=table * b)
    return out + resized_table(table_grid**2 * width, table, dtype) + Cost(act_read_bytes=table * b)


def clip_embeddings(batch: int, side: int, table_grid: int, width: int, dtype: object) -> Cost:
    """CLS token prepended to the side^2 patch features, then the position table added.

    T = side^2 + 1. cat: the CLS vector (a weight, C*b, broadcast over the batch) and the
    patches B*side^2*C*b -> B*T*C*b. Positions: side == table_grid adds the table itself
    (a weight, T*C*b); otherwise the patch rows are resized (resized_table of
    table_grid^2*C -> side^2*C) and cat'ed after the CLS row (weight C*b): read side^2*C*b,
    write T*C*b. The add reads B*T*C*b and the table T*C*b, writes B*T*C*b. other = B*T*C.
    """
    _check(batch=batch, side=side, table_grid=table_grid, width=width)
    b = dtype_bytes(dtype)
    t = side * side + 1
    elements = batch * t * width
    patches = side * side * width
    cls = Cost(weight_bytes=width * b, act_read_bytes=batch * patches * b, act_write_bytes=elements * b)
    add_pos = Cost(other_flops=elements, act_read_bytes=elements * b, act_write_bytes=elements * b)
    if side == table_grid:
        return cls + add_pos + Cost(weight_bytes=t * width * b)
    resized = resized_table(table_grid**2 * width, patches, dtype) + Cost(
        weight_bytes=width * b, act_read_bytes=patches * b, act_write_bytes=t * width * b
    )
    return cls + resized + add_pos + Cost(act_read_bytes=t * width * b)


def window_partition(batch: int, grid: int, width: int, window: int, dtype: object) -> Cost:
    """SAM's window partition of a [B, g, g, C] map and its inverse around windowed attention.

    gp = ceil(g/window)*window; n = B*g^2*C, np = B*gp^2*C. Zero-pad (n*b -> np*b, a copy even
    without padding), permute into windows (copy np*b -> np*b), back (np*b -> np*b), and crop
    the padding away (n*b -> n*b, only when gp > g).
    """
    _check(batch=batch, grid=grid, width=width, window=window)
    if window < 1:
        raise ValueError(f"shape: window must be at least 1, got {window}")
    b = dtype_bytes(dtype)
    padded = math.ceil(grid / window) * window
    n = batch * grid * grid * width
    np_ = batch * padded * padded * width
    crop = n if padded > grid else 0
    return Cost(act_read_bytes=(n + 2 * np_ + crop) * b, act_write_bytes=(3 * np_ + crop) * b)


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


def rel_pos_offsets(side: int) -> Cost:
    """The [side, side] index of query-key offsets SAM builds for one rel-pos table.

    Two aranges (int64, 8k each), scaled to fp32 (8k -> 4k each), subtracted (8k -> 4k^2),
    shifted (4k^2 -> 4k^2) and cast to int64 (4k^2 -> 8k^2): read 24k + 8k^2, write 24k + 16k^2.
    """
    _check(side=side)
    k = side
    return Cost(act_read_bytes=24 * k + 8 * k * k, act_write_bytes=24 * k + 16 * k * k)


#: How SAM's attention applies its relative-position bias (`sam_attention(bias=...)`).
SAM_BIAS = ("materialised", "blocked", "folded")


def sam_attention(
    batch: int,
    grid: int,
    width: int,
    heads: int,
    dtype: object,
    *,
    window: int = 0,
    table_side: int | None = None,
    bias: str = "materialised",
    tile_rows: int | None = None,
    align: int = 8,
) -> Cost:
    """SAM ViT attention with decomposed relative-position bias over a [B, grid, grid, width] map.

    Windowed (window > 0): the normed map is zero-padded to gp = ceil(grid/window)*window and
    cut into nw = (gp/window)^2 windows of L = window^2 tokens; padded tokens are keys too.
    Global (window = 0): gp = grid, nw = 1, L = grid^2. With G = B*nw, Np = B*gp^2, D = width/heads,
    k = sqrt(L) (rows = cols of the attended grid), and the rel-pos parameter tables built for
    P = table_side (default k) with 2P-1 rows:
      qkv  = linear(Np, width, 3*width, bias);  proj = linear(Np, width, width, bias)
      rel, per table (two: rows and columns):
             table: the parameter ((2P-1)*D*b, a weight), or resized_table to 2k-1 rows if P != k
             offsets: rel_pos_offsets(k); gather R [k, k, D]: read min(2k-1, k^2)*D*b and the
             k^2 int64 index, write k^2*D*b
             q copied into the layout the einsum's bmm needs: read and write Np*width*b (the
             strided q's reshape and torch's einsum permutes make exactly two copies per block)
             einsum bmm: matmul 2*G*H*L*k*D; read the copy Np*width*b and R, write G*H*L*k*b
      then, by how the bias is applied (`bias`):
      materialised (the reference): rel_h[..., None] + rel_w[..., None, :] -> G*H*L^2: other
             G*H*L^2, read 2*G*H*L*k*b, write G*H*L^2*b; its layout follows the einsum outputs,
             so the reshape to [G, H, L, L] copies it once more (read and write G*H*L^2*b);
             core: attention_core(G, H, L, L, D, mask=True)
      blocked (fast, CPU): the same add, written once into SDPA's layout, a tile of `tile_rows`
             grid rows of queries at a time (n_t = ceil(k / tile_rows) tiles), each tile one
             SDPA call with its slice of the bias: attention_core(mask=True), plus K and V read
             again by every tile after the first ((n_t - 1) * 2*G*H*L*D*b) and, with several
             tiles, each tile's output copied into its rows of the result (read and write
             G*H*L*D*b)
      folded (fast, CUDA): the bias joins the dot product, E = D + 2k rounded up to `align`:
             one-hot rows and columns of the keys (int64 token index and its row and column,
             compared with two aranges into bools, concatenated, cast: read 8*L*4 + 8*2k +
             L*2k*(1 + 1), write 8*L*3 + 8*2k + L*2k*(1 + 1 + b)); q/sqrt(D) (read and write
             G*H*L*D*b); rel_h and rel_w reshaped to [G, H, L, k], which copies them (read and
             write 2*G*H*L*k*b); q' = cat(q/sqrt(D), rel_h, rel_w) and k' = cat(k, one-hot)
             (read G*H*L*(D + 2k)*b less the one-hot's G*H*L*2k*b - L*2k*b, as it is broadcast,
             write G*H*L*(D + 2k)*b each); each padded to E, a copy even when E = D + 2k (read
             G*H*L*(D + 2k)*b, write G*H*L*E*b); core: read q', k' (G*H*L*E*b each) and v,
             write G*H*L*D*b in the [G, L, H, D] layout of CUDA's memory-efficient kernel (the
             one that takes a value head dim other than the query's), which the reshape after
             it views without a copy.
    FLOPs are the materialised form's whichever `bias`: the same useful work (folding does the
    bias adds as (E - D)/D more QK multiply-adds, which are not counted).
    """
    _check(batch=batch, grid=grid, width=width, heads=heads, window=window, align=align)
    if bias not in SAM_BIAS:
        raise ValueError(f"sam attention: bias must be one of {', '.join(SAM_BIAS)}, not {bias!r}")
    head_dim = _divides(width, heads, "sam width / heads")
    b = dtype_bytes(dtype)
    side = window if window else grid
    table_side = side if table_side is None else table_side
    _check(table_side=table_side)
    padded = math.ceil(grid / side) * side
    groups = batch * (padded // side) ** 2
    seq = side * side
    tokens = batch * padded * padded
    scores = groups * heads * seq * seq
    rows = 2 * side - 1
    gathered = min(rows, seq) * head_dim * b
    if table_side == side:
        table = Cost(weight_bytes=gathered)
    else:
        table = resized_table((2 * table_side - 1) * head_dim, rows * head_dim, dtype)
        table += Cost(act_read_bytes=gathered)
    gather = Cost(act_read_bytes=seq * INDEX_BYTES, act_write_bytes=seq * head_dim * b)
    q_copy = Cost(act_read_bytes=tokens * width * b, act_write_bytes=tokens * width * b)
    terms = groups * heads * seq * side * b  # one of rel_h, rel_w
    einsum = Cost(
        matmul_flops=2 * groups * heads * seq * side * head_dim,
        act_read_bytes=tokens * width * b + seq * head_dim * b,
        act_write_bytes=terms,
    )
    rel = 2 * (table + rel_pos_offsets(side) + gather + q_copy + einsum)
    add = Cost(other_flops=scores, act_read_bytes=2 * terms, act_write_bytes=scores * b)
    core = attention_core(groups, heads, seq, seq, head_dim, dtype, mask=True)
    copy = Cost(act_read_bytes=scores * b, act_write_bytes=scores * b)
    applied = add + copy + core
    if bias == "blocked":
        if tile_rows is None or not 1 <= tile_rows <= side:
            raise ValueError(f"sam attention: blocked needs tile_rows in 1..{side}, got {tile_rows}")
        tiles = math.ceil(side / tile_rows)
        q_bytes = groups * heads * seq * head_dim * b
        extra = Cost(act_read_bytes=(tiles - 1) * 2 * q_bytes)
        if tiles > 1:
            extra += Cost(act_read_bytes=q_bytes, act_write_bytes=q_bytes)
        applied = add + core + extra
    elif bias == "folded":
        applied = _flops(applied) + _bytes(_folded_bias(groups, heads, side, head_dim, b, align))
    return linear(tokens, width, 3 * width, dtype) + rel + applied + linear(tokens, width, width, dtype)


def _folded_bias(groups: int, heads: int, side: int, head_dim: int, b: int, align: int) -> Cost:
    """Bytes of the folded form of SAM's biased attention, after rel_h and rel_w (sam_attention)."""
    seq, extra = side * side, 2 * side
    widened = head_dim + extra
    folded = math.ceil(widened / align) * align
    per_head = groups * heads * seq
    onehot = Cost(
        act_read_bytes=INDEX_BYTES * seq * 4 + INDEX_BYTES * extra + seq * extra * 2 * BOOL_BYTES,
        act_write_bytes=INDEX_BYTES * seq * 3 + INDEX_BYTES * extra + seq * extra * (2 * BOOL_BYTES + b),
    )
    scale = Cost(act_read_bytes=per_head * head_dim * b, act_write_bytes=per_head * head_dim * b)
    terms = Cost(act_read_bytes=per_head * extra * b, act_write_bytes=per_head * extra * b)
    q_cat = Cost(act_read_bytes=per_head * widened * b, act_write_bytes=per_head * widened * b)
    k_cat = q_cat + Cost(act_read_bytes=seq * extra * b - per_head * extra * b)
    pad = Cost(act_read_bytes=per_head * widened * b, act_write_bytes=per_head * folded * b)
    core = Cost(
        act_read_bytes=per_head * (2 * folded + head_dim) * b, act_write_bytes=per_head * head_dim * b
    )
    return onehot + scale + terms + q_cat + k_cat + 2 * pad + core


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


def rope(tokens: float, hidden: int, head_dim: int, dtype: object) -> Cost:
    """Rotary embedding of one [T, H, D] tensor (n = T*hidden elements) with [T, D] cos/sin tables.

    x * cos + cat(-x2, x1) * sin as eager ops: neg (n/2 -> n/2), cat (n -> n), two multiplies
    (n + T*D -> n each), add (2n -> n): read (5.5n + 2*T*D)*b, write 4.5n*b; other = 3n.
    """
    _check(tokens=tokens, hidden=hidden, head_dim=head_dim)
    b = dtype_bytes(dtype)
    n = tokens * hidden
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
    _check(tokens=tokens, head_dim=head_dim)
    b = dtype_bytes(dtype)
    t, d = tokens, head_dim
    arange = 0 if positions_given else 8 * t
    tables = Cost(act_read_bytes=12 * t + 14 * d + 12 * t * d, act_write_bytes=arange + 4 * t + 14 * d + 14 * t * d)
    return tables + 2 * _cast(t * d, FP32, b)


def image_scatter(tokens: float, image_tokens: float, hidden: int, dtype: object) -> Cost:
    """Image features written over the `<image>` positions of the prompt's embeddings.

    ids == image_id (read T*8, write T bools), then masked_scatter: read the embeddings T*h*b,
    the mask T and the N image features N*h*b, write T*h*b.
    """
    _check(tokens=tokens, image_tokens=image_tokens, hidden=hidden)
    b = dtype_bytes(dtype)
    return Cost(
        act_read_bytes=tokens * INDEX_BYTES + tokens * BOOL_BYTES + (tokens + image_tokens) * hidden * b,
        act_write_bytes=tokens * BOOL_BYTES + tokens * hidden * b,
    )


def causal_attention(
    new_tokens: float,
    cached_tokens: float,
    hidden: int,
    heads: int,
    dtype: object,
    *,
    static_len: int | None = None,
) -> Cost:
    """Causal multi-head self-attention of `new_tokens` queries after `cached_tokens` cached ones.

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
    """
    _check(new_tokens=new_tokens, cached_tokens=cached_tokens, hidden=hidden, heads=heads)
    head_dim = _divides(hidden, heads, "lm hidden / heads")
    b = dtype_bytes(dtype)
    keys = cached_tokens + new_tokens
    core = attention_core(1, heads, new_tokens, keys, head_dim, dtype, kv_from_cache=True)
    kept = new_tokens * cached_tokens + new_tokens * (new_tokens + 1) / 2  # scores per head
    masked = heads * (new_tokens * keys - kept)
    append = Cost(act_read_bytes=2 * new_tokens * hidden * b, kv_write_bytes=2 * new_tokens * hidden * b)
    if static_len is not None:
        if new_tokens != 1 or static_len < keys:
            raise ValueError(f"attention: a static step feeds 1 token into {keys} <= static_len, not {static_len}")
        core = replace(core, kv_read_bytes=2 * static_len * hidden * b)
        core += Cost(act_read_bytes=static_len * BOOL_BYTES + 2 * INDEX_BYTES)
    return (
        4 * linear(new_tokens, hidden, hidden, dtype, bias=False)
        + 2 * rope(new_tokens, hidden, head_dim, dtype)
        + append
        + replace(core, masked_matmul_flops=4 * masked * head_dim, masked_other_flops=SOFTMAX_FLOPS * masked)
    )


def static_step_inputs(static_len: int, vocab: int, *, graph: bool) -> Cost:
    """What a positioned decode step over a static cache of M positions moves besides its layers
    (the fast decode): the token copied into its buffer (read and write 8 bytes) and the position
    filled (write 8); the visibility mask, arange(M) <= position (write 8M; read 8M + 8, write M
    bools); replayed from a CUDA graph (`graph`), a copy of the graph's fp32 logits (read and
    write 4V)."""
    _check(static_len=static_len, vocab=vocab)
    m = static_len
    logits = 4 * vocab if graph else 0
    return Cost(act_read_bytes=8 + 8 * m + 8 + logits, act_write_bytes=8 + 8 + 8 * m + m * BOOL_BYTES + logits)


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
        raise ValueError(f"moe: top_k must be in 1..{n_experts}, got {top_k}")
    return n_experts * (1 - (1 - top_k / n_experts) ** tokens)


#: How the routed experts of a MoE layer run (`moe_parts(routed=...)`).
MOE_ROUTED = ("looped", "grouped", "gathered", "one_by_one")


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
    routed: str = "looped",
) -> dict[str, Cost]:
    """DeepSeek-V2 MoE over T tokens, split into its "gate", "routed" and "shared" parts.

    gate:   fp32 F.linear(x.float(), W.float()) -> matmul 2*T*h*E; softmax other 5*T*E;
            weights E*h*b; the fp32 copies of x and W are written, then read (none in fp32);
            logits and probabilities (T*E*4) written and read; top-k reads the probabilities
            and writes T*k fp32 weights and int64 ids.
    routed: T*k token-expert pairs through bias-free SwiGLU experts of width I:
            matmul 6*T*k*h*I; weights read only for the experts touched: X*3*h*I*b, X given
            or expected_distinct_experts(T, E, k); weighting and summing other 2*P*h; the fp32
            sum cast back (T*h*4 -> T*h*b). With P = T*k, by `routed`:
      looped (the reference): swiglu_mlp(P, h, I) bytes for the expert SwiGLUs; argsort
            of the ids (P*8 -> 2*P*8: sorted values and order), token of each pair (P*8 ->
            P*8), gather of the tokens (T*h*b + P*8 -> P*h*b), one SwiGLU per expert, cat of
            the expert outputs (P*h*b -> P*h*b), cast to fp32 (P*h*b -> P*h*4), gather of the
            routing weights (P*4 + P*8 -> P*4), weighting (P*h*4 + P*4 -> P*h*4), an fp32 zero
            buffer (T*h*4), index_add_ into it (P*8 + P*h*4 + T*h*4 -> T*h*4).
      grouped, gathered, one_by_one: gate and up as one product per expert, so the rows are
            read once (_fused_experts: P*h*b; h*b in the gathered form's batched matmul);
      grouped: stable sort of the ids (P*8 -> 2*P*8), group ends by searchsorted over
            arange(E) (E*8 written; P*8 + E*8 -> E*8; cast to int32 E*8 -> E*4), the rows:
            for one token x repeated k times (h*b -> P*h*b), else the token of each pair
            (P*8 -> P*8) and its gather (min(T, P)*h*b + P*8 -> P*h*b); two grouped GEMMs
            (each reading the E*4 ends too) with SwiGLU between; the routing weights gathered
            into pair order (P*4 + P*8 -> P*4); the outputs cast to fp32 (P*h*b -> P*h*4);
            then for one token the [1, P] x [P, h] product (P*4 + P*h*4 -> h*4), else the
            looped form's weighting, zero buffer and index_add_ (the token of each pair again).
      gathered (one token): the k experts' weights gathered into [k, ...] copies (the weights
            read, k*8 ids read twice, k*3*h*I*b written) and read again by two batched
            matmuls (x read once, h*b); outputs cast to fp32 and summed by [1, k] x [k, h].
      one_by_one (one token, ids read on the host): per expert two matrix-vector products
            and SwiGLU; cat of the k outputs (k*h*b -> k*h*b), cast to fp32, [1, k] x [k, h].
    shared: swiglu_mlp(T, h, I_shared) over all tokens, its output added to the routed sum.
    FLOPs are the looped form's whichever `routed`.
    """
    _check(tokens=tokens, expert_intermediate=expert_intermediate, shared_intermediate=shared_intermediate)
    if routed not in MOE_ROUTED:
        raise ValueError(f"moe: routed must be one of {', '.join(MOE_ROUTED)}, not {routed!r}")
    if routed in ("gathered", "one_by_one") and tokens != 1:
        raise ValueError(f"moe: the {routed} experts run one token at a time, not {tokens}")
    touched = experts_touched
    if touched is None:
        touched = expected_distinct_experts(tokens, n_experts, top_k)
    _check(experts_touched=touched)
    if touched > min(n_experts, tokens * top_k):
        limit = min(n_experts, tokens * top_k)
        raise ValueError(f"moe: {touched} experts touched, more than min(E, T*k) = {limit}")
    b = dtype_bytes(dtype)
    pairs = tokens * top_k
    copies = (tokens + n_experts) * hidden * FP32 if b != FP32 else 0
    logits = tokens * n_experts * FP32
    gate = Cost(
        matmul_flops=2 * tokens * hidden * n_experts,
        other_flops=SOFTMAX_FLOPS * tokens * n_experts,
        weight_bytes=n_experts * hidden * b,
        act_read_bytes=tokens * hidden * b + copies + 2 * logits,
        act_write_bytes=copies + 2 * logits + pairs * (FP32 + INDEX_BYTES),
    )
    experts = replace(swiglu_mlp(pairs, hidden, expert_intermediate, dtype), weight_bytes=0)
    weights = Cost(weight_bytes=touched * 3 * hidden * expert_intermediate * b)
    looped = _looped_around_experts(tokens, pairs, hidden, b)
    if routed == "looped":
        moved = _bytes(experts) + looped
    elif routed == "grouped":
        moved = _fused_experts(pairs, hidden, expert_intermediate, b, pairs * hidden * b)
        moved += _grouped_around_experts(tokens, pairs, hidden, n_experts, b)
    else:
        x_read = (1 if routed == "gathered" else top_k) * hidden * b  # a batched matmul reads x once
        moved = _fused_experts(pairs, hidden, expert_intermediate, b, x_read)
        moved += _one_token_around_experts(top_k, hidden, expert_intermediate, b, gathered=routed == "gathered")
    cast_back = _cast(tokens * hidden, FP32, b)
    routed_cost = _flops(experts + looped) + weights + _bytes(moved) + cast_back
    shared = swiglu_mlp(tokens, hidden, shared_intermediate, dtype) + add(tokens * hidden, dtype)
    return {"gate": gate, "routed": routed_cost, "shared": shared}


def _index_add_sum(tokens: float, pairs: float, hidden: int) -> Cost:
    """Weight the P fp32 expert outputs and index_add_ them into an fp32 zero buffer [T, h]."""
    weighted = Cost(
        other_flops=pairs * hidden,
        act_read_bytes=pairs * (hidden + 1) * FP32,
        act_write_bytes=pairs * hidden * FP32,
    )
    summed = Cost(
        other_flops=pairs * hidden,
        act_read_bytes=pairs * INDEX_BYTES + (pairs + tokens) * hidden * FP32,
        act_write_bytes=2 * tokens * hidden * FP32,
    )
    return weighted + summed


def _pair_weights(pairs: float) -> Cost:
    """The P fp32 routing weights gathered into expert order by their int64 order."""
    return Cost(act_read_bytes=pairs * (FP32 + INDEX_BYTES), act_write_bytes=pairs * FP32)


def _one_token_sum(pairs: float, hidden: int) -> Cost:
    """One token's weighted sum of its P fp32 expert outputs as a [1, P] x [P, h] product."""
    return Cost(act_read_bytes=pairs * (hidden + 1) * FP32, act_write_bytes=hidden * FP32)


def _fused_experts(pairs: float, hidden: int, intermediate: int, b: int, x_read: float) -> Cost:
    """Activation bytes of P rows through SwiGLU experts whose gate and up products are one
    product ([P, h] -> [P, 2I]; it reads the rows `x_read` bytes), then silu(gate) * up (read
    3*P*I*b, write 2*P*I*b) and down ([P, I] -> [P, h])."""
    p, i = pairs, intermediate
    return Cost(act_read_bytes=x_read + 4 * p * i * b, act_write_bytes=4 * p * i * b + p * hidden * b)


def _looped_around_experts(tokens: float, pairs: float, hidden: int, b: int) -> Cost:
    """The reference's dispatch and combine around its per-expert loop (moe_parts, looped)."""
    ids = pairs * INDEX_BYTES
    dispatch = (
        Cost(act_read_bytes=ids, act_write_bytes=2 * ids)
        + Cost(act_read_bytes=ids, act_write_bytes=ids)
        + Cost(act_read_bytes=tokens * hidden * b + ids, act_write_bytes=pairs * hidden * b)
    )
    cat = Cost(act_read_bytes=pairs * hidden * b, act_write_bytes=pairs * hidden * b)
    combine = cat + _cast(pairs * hidden, b, FP32) + _pair_weights(pairs)
    return dispatch + combine + _index_add_sum(tokens, pairs, hidden)


def _grouped_around_experts(tokens: float, pairs: float, hidden: int, n_experts: int, b: int) -> Cost:
    """Sort, group ends, rows and combine of the grouped-GEMM experts (moe_parts, grouped)."""
    ids, ends = pairs * INDEX_BYTES, n_experts * INDEX_BYTES
    groups = (
        Cost(act_read_bytes=ids, act_write_bytes=2 * ids)
        + Cost(act_write_bytes=ends)
        + Cost(act_read_bytes=ids + ends, act_write_bytes=ends)
        + Cost(act_read_bytes=ends, act_write_bytes=n_experts * 4)
        + Cost(act_read_bytes=2 * n_experts * 4)  # each grouped GEMM reads the int32 ends
    )
    token_of = Cost(act_read_bytes=ids, act_write_bytes=ids)
    if tokens == 1:
        rows = Cost(act_read_bytes=hidden * b, act_write_bytes=pairs * hidden * b)
    else:
        gather = min(tokens, pairs) * hidden * b
        rows = token_of + Cost(act_read_bytes=gather + ids, act_write_bytes=pairs * hidden * b)
    cast = _cast(pairs * hidden, b, FP32)
    combine = _one_token_sum(pairs, hidden) if tokens == 1 else token_of + _index_add_sum(tokens, pairs, hidden)
    return groups + rows + _pair_weights(pairs) + cast + combine


def _one_token_around_experts(top_k: int, hidden: int, intermediate: int, b: int, *, gathered: bool) -> Cost:
    """What one token's k experts move besides their SwiGLUs (moe_parts, gathered / one_by_one)."""
    outputs = top_k * hidden
    combine = _cast(outputs, b, FP32) + _one_token_sum(top_k, hidden)
    if not gathered:
        return Cost(act_read_bytes=outputs * b, act_write_bytes=outputs * b) + combine
    copy = 3 * top_k * hidden * intermediate * b  # written by the gathers, read by the matmuls
    return Cost(act_read_bytes=2 * top_k * INDEX_BYTES + copy, act_write_bytes=copy) + combine


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
    routed: str = "looped",
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
        routed=routed,
    )
    return sum(parts.values(), Cost())


def lm_head(
    tokens: float, hidden: int, vocab: int, dtype: object, *, logits_dtype: object = "float32"
) -> Cost:
    """Output projection to the vocabulary, then the cast of the logits (fp32 by default).

    matmul = 2*T*h*V; weights = V*h*b; plus the cast: read T*V*b, write T*V*b_logits (none
    when the model already computes in the logits' dtype).
    """
    _check(tokens=tokens, hidden=hidden, vocab=vocab)
    b = dtype_bytes(dtype)
    cast = _cast(tokens * vocab, b, dtype_bytes(logits_dtype))
    return linear(tokens, hidden, vocab, dtype, bias=False) + cast
