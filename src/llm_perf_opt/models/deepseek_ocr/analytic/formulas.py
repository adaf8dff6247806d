"""DeepSeek-OCR's own module families: the analytic cost of one call of SAM's and CLIP's
embeddings and attention, the image scatter, the static decode step's inputs, and the
DeepSeek-V2 MoE as this implementation runs it (reference and fast formulations).

The conventions are those of `llm_perf_opt.analytic.families` (2 FLOPs per multiply-add, bytes
of each eager aten op, one fused attention kernel), whose model-independent families (linear,
norms, attention core, RoPE, SwiGLU, lm_head, the expected distinct experts of uniform
routing) these are built from.
"""

from __future__ import annotations

import math
from dataclasses import replace

from llm_perf_opt.analytic.families import (
    BOOL_BYTES,
    FP32,
    INDEX_BYTES,
    SOFTMAX_FLOPS,
    Cost,
    add,
    attention_core,
    bytes_only,
    cast,
    check_sizes,
    divides,
    dtype_bytes,
    expected_distinct_experts,
    flops_only,
    linear,
    resized_table,
    swiglu_mlp,
)


def sam_pos_embed(batch: int, grid: int, table_grid: int, width: int, dtype: object) -> Cost:
    """x + pos over a [B, g, g, C] map, the table of table_grid^2 positions resized if g differs.

    g == table_grid: read B*g^2*C*b and the table g^2*C*b (a weight), write B*g^2*C*b.
    otherwise: resized_table(P^2*C -> g^2*C), then the add reads the resized g^2*C*b.
    other = B*g^2*C.
    """
    check_sizes(batch=batch, grid=grid, table_grid=table_grid, width=width)
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
    check_sizes(batch=batch, side=side, table_grid=table_grid, width=width)
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
    check_sizes(batch=batch, grid=grid, width=width, window=window)
    if window < 1:
        raise ValueError(f"shape: window must be at least 1, got {window}")
    b = dtype_bytes(dtype)
    padded = math.ceil(grid / window) * window
    n = batch * grid * grid * width
    np_ = batch * padded * padded * width
    crop = n if padded > grid else 0
    return Cost(act_read_bytes=(n + 2 * np_ + crop) * b, act_write_bytes=(3 * np_ + crop) * b)


def rel_pos_offsets(side: int) -> Cost:
    """The [side, side] index of query-key offsets SAM builds for one rel-pos table.

    Two aranges (int64, 8k each), scaled to fp32 (8k -> 4k each), subtracted (8k -> 4k^2),
    shifted (4k^2 -> 4k^2) and cast to int64 (4k^2 -> 8k^2): read 24k + 8k^2, write 24k + 16k^2.
    """
    check_sizes(side=side)
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
    check_sizes(batch=batch, grid=grid, width=width, heads=heads, window=window, align=align)
    if bias not in SAM_BIAS:
        raise ValueError(f"sam attention: bias must be one of {', '.join(SAM_BIAS)}, not {bias!r}")
    head_dim = divides(width, heads, "sam width / heads")
    b = dtype_bytes(dtype)
    side = window if window else grid
    table_side = side if table_side is None else table_side
    check_sizes(table_side=table_side)
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
        applied = flops_only(applied) + bytes_only(_folded_bias(groups, heads, side, head_dim, b, align))
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
    check_sizes(batch=batch, tokens=tokens, width=width, heads=heads)
    head_dim = divides(width, heads, "clip width / heads")
    rows = batch * tokens
    return (
        linear(rows, width, 3 * width, dtype)
        + attention_core(batch, heads, tokens, tokens, head_dim, dtype)
        + linear(rows, width, width, dtype)
    )


def image_scatter(tokens: float, image_tokens: float, hidden: int, dtype: object) -> Cost:
    """Image features written over the `<image>` positions of the prompt's embeddings.

    ids == image_id (read T*8, write T bools), then masked_scatter: read the embeddings T*h*b,
    the mask T and the N image features N*h*b, write T*h*b.
    """
    check_sizes(tokens=tokens, image_tokens=image_tokens, hidden=hidden)
    b = dtype_bytes(dtype)
    return Cost(
        act_read_bytes=tokens * INDEX_BYTES + tokens * BOOL_BYTES + (tokens + image_tokens) * hidden * b,
        act_write_bytes=tokens * BOOL_BYTES + tokens * hidden * b,
    )


def image_layout(grid: tuple[int, int], side: int, tile_side: int, hidden: int, dtype: object) -> Cost:
    """The image features laid out for the LM (projector.layout_image_embeds), C = hidden.

    Global view, q = side: a newline closing each of its q rows, one cat: read q^2*C*b and the
    newline (a weight, C*b), write q*(q + 1)*C*b. Tiles (cols x rows > 1, q_t = tile_side):
    stitched into one [rows*q_t, cols*q_t, C] map, a copy when cols > 1 (read and write
    R*C*b, R = cols*rows*q_t^2), then the newlines the same way (read R*C*b + C*b, write
    rows*q_t*(cols*q_t + 1)*C*b). Last, both parts and the separator (a weight, C*b) in one
    cat: read and write N*C*b, N the image tokens less the separator, plus its C*b written.
    """
    cols, rows = grid
    check_sizes(side=side, tile_side=tile_side, hidden=hidden, cols=cols, rows=rows)
    b = dtype_bytes(dtype)
    row = hidden * b

    def with_newlines(lines: int, per_line: int) -> tuple[Cost, int]:
        tokens = lines * (per_line + 1)
        return Cost(
            weight_bytes=row, act_read_bytes=lines * per_line * row, act_write_bytes=tokens * row
        ), tokens

    cost, tokens = with_newlines(side, side)
    if cols * rows > 1:
        tiled = cols * rows * tile_side * tile_side * row
        if cols > 1:
            cost += Cost(act_read_bytes=tiled, act_write_bytes=tiled)
        tiles, tile_tokens = with_newlines(rows * tile_side, cols * tile_side)
        cost, tokens = cost + tiles, tokens + tile_tokens
    return cost + Cost(weight_bytes=row, act_read_bytes=tokens * row, act_write_bytes=(tokens + 1) * row)


def weight_major_rows(
    rows: float, in_features: int, out_features: int, dtype: object, block_rows: int
) -> Cost:
    """What a product of M few rows computed weight-major (the fast `rows_product`) moves beyond
    linear(M, K, N): each of the ceil(N/C) blocks of C = block_rows weight rows reads x [M, K]
    (one of those reads is linear's) and writes its [C, M] result, which is copied transposed
    into the output (linear's write): (ceil(N/C) - 1)*M*K*b + M*N*b read, M*N*b written."""
    check_sizes(rows=rows, in_features=in_features, out_features=out_features, block_rows=block_rows)
    b = dtype_bytes(dtype)
    blocks = math.ceil(out_features / block_rows)
    out = rows * out_features * b
    return Cost(act_read_bytes=(blocks - 1) * rows * in_features * b + out, act_write_bytes=out)


def weight_major_swiglu(rows: float, hidden: int, intermediate: int, dtype: object, block_rows: int) -> Cost:
    """weight_major_rows of a bias-free SwiGLU's three products (gate and up: h -> I; down: I -> h)."""
    return 2 * weight_major_rows(rows, hidden, intermediate, dtype, block_rows) + weight_major_rows(
        rows, intermediate, hidden, dtype, block_rows
    )


def greedy_pick(vocab: int, batch: int = 1) -> Cost:
    """The next token of each of B sequences, greedily: argmax over one position's fp32 logits
    per sequence (read 4*B*V), B int64s written."""
    check_sizes(vocab=vocab, batch=batch)
    return Cost(act_read_bytes=FP32 * vocab * batch, act_write_bytes=INDEX_BYTES * batch)


def static_step_inputs(static_len: int, vocab: int, *, graph: bool, batch: int = 1) -> Cost:
    """What a positioned decode step over a static cache of M positions moves besides its layers
    (the fast decode): the B tokens copied into their buffer (read and write 8B bytes) and the
    position filled (write 8); the visibility mask, arange(M) <= position (write 8M; read 8M + 8,
    write M bools); replayed from a CUDA graph (`graph`), a copy of the graph's fp32 logits
    (read and write 4BV)."""
    check_sizes(static_len=static_len, vocab=vocab, batch=batch)
    m = static_len
    logits = 4 * vocab * batch if graph else 0
    tokens = 8 * batch
    return Cost(
        act_read_bytes=tokens + 8 * m + 8 + logits,
        act_write_bytes=tokens + 8 + 8 * m + m * BOOL_BYTES + logits,
    )


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
    weight_major_block: int | None = None,
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
      one_by_one (ids read on the host): for one token per expert two matrix-vector products
            and SwiGLU; cat of the k outputs (k*h*b -> k*h*b), cast to fp32, [1, k] x [k, h].
            For more tokens the looped form's dispatch and combine around each expert's
            gate+up and down products on its rows.
    shared: swiglu_mlp(T, h, I_shared) over all tokens, its output added to the routed sum.
    With `weight_major_block` (a few tokens on CPU in fp32) the shared experts' products, and
    the many-token one_by_one experts' (on the P rows: gate+up h -> 2I, down I -> h), run
    weight-major in blocks of that many weight rows: plus weight_major_rows of each.
    FLOPs are the looped form's whichever `routed`.
    """
    check_sizes(
        tokens=tokens, expert_intermediate=expert_intermediate, shared_intermediate=shared_intermediate
    )
    if routed not in MOE_ROUTED:
        raise ValueError(f"moe: routed must be one of {', '.join(MOE_ROUTED)}, not {routed!r}")
    if routed == "gathered" and tokens != 1:
        raise ValueError(f"moe: the gathered experts run one token at a time, not {tokens}")
    touched = experts_touched
    if touched is None:
        touched = expected_distinct_experts(tokens, n_experts, top_k)
    check_sizes(experts_touched=touched)
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
        moved = bytes_only(experts) + looped
    elif routed == "grouped":
        moved = _fused_experts(pairs, hidden, expert_intermediate, b, pairs * hidden * b)
        moved += _grouped_around_experts(tokens, pairs, hidden, n_experts, b)
    elif tokens != 1:  # one_by_one over several tokens
        moved = _fused_experts(pairs, hidden, expert_intermediate, b, pairs * hidden * b) + looped
        if weight_major_block is not None:
            moved += weight_major_rows(pairs, hidden, 2 * expert_intermediate, dtype, weight_major_block)
            moved += weight_major_rows(pairs, expert_intermediate, hidden, dtype, weight_major_block)
    else:
        x_read = (1 if routed == "gathered" else top_k) * hidden * b  # a batched matmul reads x once
        moved = _fused_experts(pairs, hidden, expert_intermediate, b, x_read)
        moved += _one_token_around_experts(
            top_k, hidden, expert_intermediate, b, gathered=routed == "gathered"
        )
    cast_back = cast(tokens * hidden, FP32, b)
    routed_cost = flops_only(experts + looped) + weights + bytes_only(moved) + cast_back
    shared = swiglu_mlp(tokens, hidden, shared_intermediate, dtype) + add(tokens * hidden, dtype)
    if weight_major_block is not None:
        shared += weight_major_swiglu(tokens, hidden, shared_intermediate, dtype, weight_major_block)
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
    combine = cat + cast(pairs * hidden, b, FP32) + _pair_weights(pairs)
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
    to_fp32 = cast(pairs * hidden, b, FP32)
    combine = (
        _one_token_sum(pairs, hidden) if tokens == 1 else token_of + _index_add_sum(tokens, pairs, hidden)
    )
    return groups + rows + _pair_weights(pairs) + to_fp32 + combine


def _one_token_around_experts(top_k: int, hidden: int, intermediate: int, b: int, *, gathered: bool) -> Cost:
    """What one token's k experts move besides their SwiGLUs (moe_parts, gathered / one_by_one)."""
    outputs = top_k * hidden
    combine = cast(outputs, b, FP32) + _one_token_sum(top_k, hidden)
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
    weight_major_block: int | None = None,
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
        weight_major_block=weight_major_block,
    )
    return sum(parts.values(), Cost())
