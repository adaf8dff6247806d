"""Count the bytes eager PyTorch moves: every aten op reads its tensor inputs and writes its
tensor outputs once. Works on the meta device (shapes only), like FlopCounterMode.

    with ByteCounter(weights=model.parameters(), kv=cache.keys + cache.values) as counter:
        model(x)
    counter.total      Cost(weight_bytes, act_read_bytes, act_write_bytes, kv_read_bytes, kv_write_bytes: bytes only)
    counter.by_op      aten op name -> Cost (bytes only)

A TorchDispatchMode sees every aten op below autograd, so composite ops arrive decomposed
(`linear` as `t` + `addmm`, `reshape` as `view` or `clone` + `_unsafe_view`). Per op:

* Views and pure metadata ops move nothing. The schema decides: `func.is_view` (the return
  aliases an input and nothing is written: view, transpose, permute, expand, slice, select,
  unsqueeze, squeeze, t, alias, detach, as_strided, unbind, split_with_sizes, ...). Ops whose
  schema does not annotate the alias (`_unsafe_view`) are caught at run time: an op that
  writes nothing and returns tensors that all share an input's storage is a view too. Storage
  identity is the `untyped_storage()`, which meta tensors have as well. An op returning no
  tensor (`.item()`) still reads its inputs.
* Allocation without initialisation moves nothing: ops named `empty*` / `new_empty*`.
  Other factories (`zeros`, `arange`, `ones`) write their output.
* An input is read over its footprint: the distinct elements it addresses (the product of
  the sizes of its dimensions with a non-zero stride) times the element size, so a broadcast
  (expanded, stride-0) operand counts once, not once per use.
* Gathers (`embedding`, `index.Tensor`, `index_select`, `gather`) read from their source at
  most the bytes they output: min(source footprint, output bytes). An embedding lookup reads
  the rows it gathers; a small table gathered many times is read once.
* A grouped GEMM (`_grouped_mm`, 3-d weights and group end offsets) reads the weights of the
  groups that get rows only: the weight footprint x non-empty groups / groups, the offsets
  read on the host. Meta tensors carry no offsets, so there every group counts as read.
* An argument the schema marks as written (`Tensor(a!)`) counts as written over its whole
  footprint (exact for `copy_` into a slice view and for an `index_add_` that reaches every
  row), except `index_copy_`, which writes (and reads nothing of) its target only where the
  source goes: the source's bytes, as a KV-cache write at one position is. The `self` of an
  in-place op (`Tag.inplace`) is read too, unless the op only overwrites it (`copy_`,
  `fill_`, `zero_`, `index_copy_`); `out=` tensors are only written. Returned aliases are not counted again.
* Scaled-dot-product attention counts as the single fused kernel it is on CUDA and CPU: read
  q, k, v and the mask once, write the output; the score matrix is never written. On the
  meta device `F.scaled_dot_product_attention` decomposes (before any dispatch mode sees it)
  into scale, bmm, softmax, bmm, which would write the scores; a TorchFunctionMode takes the
  call at the Python level instead, counts the fused kernel, and on meta returns the output
  in the fused kernels' layout (see `_fused_attention`; the decomposition still runs there,
  uncounted, for a FLOP counter beside this one). Other devices run the real kernel, uncounted.

Categories, by storage: an input whose storage is a parameter's is a weight read
(parameters are never written in inference); an input or output whose storage is a KV-cache
buffer's is a KV read or write; everything else is an activation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from llm_perf_opt.analytic.families import Cost

_aten = torch.ops.aten
_GATHERS = frozenset(
    {_aten.embedding.default, _aten.index.Tensor, _aten.index_select.default, _aten.gather.default}
)
_INDEX_COPY = _aten.index_copy_.default
_OVERWRITES = frozenset(
    {_aten.copy_.default, _aten.fill_.Scalar, _aten.fill_.Tensor, _aten.zero_.default, _INDEX_COPY}
)
_GROUPED_MM = _aten._grouped_mm.default

#: Name `by_op` gives the fused attention kernel.
ATTENTION = "scaled_dot_product_attention"


def footprint(t: torch.Tensor) -> int:
    """Bytes of the distinct elements `t` addresses: sizes of its non-broadcast dims times itemsize."""
    elements = 1
    for size, stride in zip(t.shape, t.stride(), strict=True):
        if stride != 0 or size == 0:
            elements *= size
    return elements * t.element_size()


def _grouped_weight_bytes(weights: torch.Tensor, offs: torch.Tensor | None) -> int:
    """Bytes a grouped GEMM reads of its [groups, K, N] weights: the groups that get rows."""
    if weights.dim() != 3 or offs is None or offs.is_meta:
        return footprint(weights)
    ends = offs.tolist()
    used = sum(1 for start, end in zip([0, *ends], ends) if end > start)
    return footprint(weights) * used // weights.shape[0]


def _storage(t: torch.Tensor) -> int:
    # The StorageImpl's address: shared by a tensor and all its views, on meta too.
    return t.untyped_storage()._cdata


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [x for x in tree_leaves(tree) if isinstance(x, torch.Tensor)]


def _written(
    func: torch._ops.OpOverload, args: tuple, kwargs: dict
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Tensors the schema marks as mutated (`Tensor(a!)`): (in-place positional args, out= args)."""
    in_place, out = [], []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        if arg.kwarg_only:
            out += _tensors(kwargs.get(arg.name))
        else:
            in_place += _tensors(args[i] if i < len(args) else kwargs.get(arg.name))
    return in_place, out


def _is_allocation(func: torch._ops.OpOverload) -> bool:
    name = func._schema.name.removeprefix("aten::")
    return name.startswith(("empty", "new_empty"))


def _fused_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any):
    """F.scaled_dot_product_attention, with the output layout of the fused kernels on meta.

    The CPU flash kernel allocates its output like the query (`empty_like`); the CUDA flash and
    memory-efficient kernels allocate [B, Sq, H, D] and return its transpose, the same layout
    for the [B, S, H, D]-strided queries a projection followed by a transpose gives. Later
    reshapes are views or copies depending on that layout, so it must be the real one. A value
    head dim other than the query's runs only in CUDA's memory-efficient kernel (flash needs
    them equal; CPU falls back to the unfused math path), so on meta such a call gets its
    [B, Sq, H, Dv]-transposed output.
    """
    if query.is_meta:
        # The decomposition runs too, uncounted here (the counter is suspended), so that a FLOP
        # counter beside this one (analytic.counted) sees the attention's matrix products.
        F.scaled_dot_product_attention(query, key, value, *args, **kwargs)
    if query.is_meta and value.shape[-1] == query.shape[-1]:
        return torch.empty_like(query)
    if query.is_meta:
        b, heads, sq, _ = query.shape
        return query.new_empty(b, sq, heads, value.shape[-1]).transpose(1, 2)
    return F.scaled_dot_product_attention(query, key, value, *args, **kwargs)


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: ByteCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.counter.suspended:
            self.counter.record_op(func, args, kwargs, out)
        return out


class _FusedAttention(TorchFunctionMode):
    def __init__(self, counter: ByteCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention or self.counter.suspended:
            return func(*args, **kwargs)
        self.counter.suspended = True
        try:
            out = _fused_attention(*args, **kwargs)
        finally:
            self.counter.suspended = False
        inputs = _tensors((args, kwargs))
        self.counter.record(ATTENTION, [(t, footprint(t)) for t in inputs], [(out, footprint(out))])
        return out


class ByteCounter:
    """Context manager counting the bytes of every aten op run inside it (see module docstring).

    weights: the model's parameters; kv: the KV-cache buffers (their views count as the buffer),
    or a function giving them, asked again at every op, for a cache allocated inside the block.
    Dense tensors only (a tensor without a storage cannot be classified).
    """

    def __init__(
        self,
        weights: Iterable[torch.Tensor] = (),
        kv: Iterable[torch.Tensor] | Callable[[], Sequence[torch.Tensor]] = (),
    ) -> None:
        self._weights = {_storage(t) for t in weights}
        self._kv_source = kv if callable(kv) else None
        self._kv_buffers: list[torch.Tensor] = [] if callable(kv) else list(kv)
        self._kv = {_storage(t) for t in self._kv_buffers}
        self.by_op: dict[str, Cost] = {}
        self.suspended = False
        self._modes: list[Any] = []

    @property
    def total(self) -> Cost:
        return sum(self.by_op.values(), Cost())

    def __enter__(self) -> ByteCounter:
        if torch.is_inference_mode_enabled():
            # There the dispatch mode sees composite ops whole (`linear`, `einsum`, `reshape`),
            # and the copies inside them go uncounted.
            raise RuntimeError("ByteCounter counts under torch.no_grad(), not under torch.inference_mode()")
        self._modes = [_FusedAttention(self), _Dispatch(self)]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        self._modes = []

    def _refresh_kv(self) -> None:
        if self._kv_source is None:
            return
        buffers = self._kv_source()
        # The same buffers as last time (compared by identity): their storages are known.
        if len(buffers) != len(self._kv_buffers) or any(
            a is not b for a, b in zip(buffers, self._kv_buffers)
        ):
            self._kv_buffers = list(buffers)
            self._kv = {_storage(t) for t in buffers}

    def record_op(self, func: torch._ops.OpOverload, args: tuple, kwargs: dict, out: Any) -> None:
        """Count one aten op by the rules of the module docstring."""
        if func.is_view or _is_allocation(func):
            return
        inputs = _tensors((args, kwargs))
        outputs = _tensors(out)
        in_place, out_args = _written(func, args, kwargs)
        in_storages = {_storage(t) for t in inputs}
        if not in_place and not out_args and outputs and all(_storage(t) in in_storages for t in outputs):
            return
        written = {id(t) for t in in_place + out_args}
        reads = [t for t in inputs if id(t) not in written]
        if torch.Tag.inplace in func.tags and func not in _OVERWRITES:
            reads += in_place
        sizes = [footprint(t) for t in reads]
        if func in _GATHERS:
            sizes[0] = min(sizes[0], sum(t.numel() * t.element_size() for t in outputs))
        if func is _GROUPED_MM:
            sizes[1] = _grouped_weight_bytes(args[1], args[2] if len(args) > 2 else kwargs.get("offs"))
        writes = in_place + out_args + [t for t in outputs if _storage(t) not in in_storages]
        written_sizes = [footprint(t) for t in writes]
        if func is _INDEX_COPY:  # (target, dim, index, source): written where the source goes
            written_sizes = [footprint(args[3])]
        self.record(
            func.overloadpacket.__name__,
            list(zip(reads, sizes, strict=True)),
            list(zip(writes, written_sizes, strict=True)),
        )

    def record(
        self, name: str, reads: list[tuple[torch.Tensor, int]], writes: list[tuple[torch.Tensor, int]]
    ) -> None:
        """Add one kernel under `name`: (tensor, bytes read from it) and (tensor, bytes written
        into it) pairs, each classified by its storage."""
        self._refresh_kv()
        weight = act_read = act_write = kv_read = kv_write = 0
        for t, size in reads:
            key = _storage(t)
            if key in self._weights:
                weight += size
            elif key in self._kv:
                kv_read += size
            else:
                act_read += size
        for t, size in writes:
            if _storage(t) in self._kv:
                kv_write += size
            else:
                act_write += size
        count = Cost(
            weight_bytes=weight,
            act_read_bytes=act_read,
            act_write_bytes=act_write,
            kv_read_bytes=kv_read,
            kv_write_bytes=kv_write,
        )
        self.by_op[name] = self.by_op.get(name, Cost()) + count
