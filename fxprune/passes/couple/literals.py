"""Rules for shape ops whose literal arguments must follow a pruned size.

* view / reshape / expand: a literal size along the pruned dim becomes the pruned size. A size the
  program computes from a channel count (``x.size(1) // 2``) decides which dim a reshape of the
  pruned tensor splits, and it ties the two tensors: both must lose the same channels;
* split / chunk along the pruned dim become a split with the pruned sizes of the pieces;
* a slice along the pruned dim is re-indexed to the kept positions; a single channel, or a gather
  with an index tensor along the channel dim, freezes the channels (a gather along other dims, such
  as a relative-position table indexed by position, keeps them);
* unbind / select along the pruned dim would turn channels into separate tensors: frozen.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx
from torch.fx.node import map_aggregate

from ...core import metakeys as keys
from ...core.fxutil import arg
from ...core.groups import Family, Patch, PatchKind
from ...core.optable import (
    ATEN_INDEX,
    ATEN_SLICE,
    ATTENTION_PRODUCTS,
    CREATE,
    INDEX_PUT,
    PASS_THROUGH,
    RESHAPE_FUNCS,
    RESHAPE_METHODS,
    SPLIT,
    UNBIND,
    UNFLATTEN,
    canonical,
)
from .labels import Labels, Param, compress
from .layout import on_labels
from .state import State, Unsupported, family, handles, target_name


@handles(RESHAPE_FUNCS, RESHAPE_METHODS)
@family(Family.SHAPE)
def reshape(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Labels:
    base, sizes = size_args(node)
    reads = [size_reads(s, size) for size in sizes]
    sources = {d: [x for x, dim in found if is_channel_count(x, dim)] for d, (found, _) in enumerate(reads)}
    # A split into attention heads keeps whole heads even where head_dim is computed from a width:
    # that size becomes a literal below. Elsewhere a computed size decides the split (``compress``).
    heads = feeds_attention(s, node)
    out = on_labels(s, node, args, kwargs, frozenset() if heads else frozenset(d for d, src in sources.items() if src), heads)

    def literal(d: int) -> None:  # size d of the output becomes a literal that follows pruning
        s.patches.append(Patch(PatchKind.ARG, node.name, node.name, d, path=(*base, d + (1 if base == ("args",) else 0))))

    for d, src in sources.items():
        # A size read from a channel count follows pruning by itself where both tensors lose the same
        # channels; where they do not (an attention's width read from its input's), and the size is
        # computed from channel counts alone, it becomes a literal.
        same = out.dim == d and all(set(s.uf.roots(lab.ids).tolist()) == set(s.uf.roots(out.ids).tolist()) for lab in src)
        if not src or same:
            continue
        found, data = reads[d]
        if len(sizes) == len(out.shape) and not data and all(is_channel_count(x, dim) for x, dim in found):
            literal(d)
            continue
        why = f"node {node.name} takes a size from the channel count of another tensor"
        s.freeze(src, why)
        s.freeze(out, why)
    if out.dim is not None and len(sizes) == len(out.shape):
        size = sizes[out.dim]
        if isinstance(size, int) and size != -1:
            literal(out.dim)
    return out


def feeds_attention(s: State, node: torch.fx.Node, depth: int = 24) -> bool:
    """True when ``node``'s output reaches an attention product (matmul, bmm, einsum, scaled dot-product
    attention) through layout and scaling ops only, and no later reshape splits it again: a reshape that
    splits channels into heads (an earlier split, q, k and v out of one projection, is not). Up to ``depth`` ops
    on: Qwen3's keys reach attention 13 ops after the split when the sequence length is symbolic (per-head norm,
    rotary embedding, grouped-query expansion)."""
    if not s.attention:  # a CNN's channel shuffles need not walk the graph
        return False
    frontier = [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for user in n.users:
                t = canonical(user.target)
                if t in ATTENTION_PRODUCTS:
                    return True
                if (t in PASS_THROUGH or user.op == "call_module") and not splits(user):
                    nxt.append(user)
        frontier = nxt
    return False


def splits(node: torch.fx.Node) -> bool:
    """True for a view, reshape or unflatten whose output has more dims than its input."""
    if canonical(node.target) not in RESHAPE_FUNCS | RESHAPE_METHODS | UNFLATTEN or canonical(node.target) in ("expand", torch.broadcast_to):
        return False
    shapes = [getattr(n.meta.get(keys.TENSOR_META), "shape", None) for n in (node.args[0], node)]
    return all(sh is not None for sh in shapes) and len(shapes[1]) > len(shapes[0])


def size_args(node: torch.fx.Node) -> tuple[tuple[Any, ...], tuple[Any, ...] | list[Any]]:
    """Where a reshape's sizes are (a path into the node's args/kwargs) and the sizes themselves."""
    a = node.args
    if node.op == "call_method" and len(a) == 2 and isinstance(a[1], (tuple, list)):
        base, sizes = ("args", 1), a[1]
    elif node.op == "call_method" and len(a) > 1:
        base, sizes = ("args",), a[1:]
    elif len(a) > 1:
        base, sizes = ("args", 1), a[1]
    else:
        key = "shape" if "shape" in node.kwargs else "size"
        base, sizes = ("kwargs", key), node.kwargs.get(key, ())
    return base, sizes if isinstance(sizes, (tuple, list)) else ()


def size_reads(s: State, size: Any) -> tuple[list[tuple[Any, Any]], bool]:
    """What a size argument is computed from: every (tensor value, dim) whose size it reads
    (``x.size(1) // 2``), and whether it also reads a tensor's data."""
    stack, seen, reads, data = [size], set(), [], False
    while stack:
        n = stack.pop()
        if not isinstance(n, torch.fx.Node) or n in seen:
            continue
        seen.add(n)
        if keys.TENSOR_META in n.meta:
            data = True
            continue
        base, dim = size_source(s, n)
        if base is not None:
            reads.append((s.as_labels(s.env[base]), dim))
            continue
        stack.extend(n.all_input_nodes)
    return reads, data


def is_channel_count(x: Any, dim: Any) -> bool:
    """True when size ``dim`` of a tensor with labels ``x`` is its channel count."""
    return isinstance(x, Labels) and x.dim is not None and isinstance(dim, int) and dim % len(x.shape) == x.dim


def channel_sources(s: State, size: Any) -> list[Labels]:
    """Labels of the tensors whose channel count a size argument is computed from (``x.size(1) // 2``)."""
    return [x for x, dim in size_reads(s, size)[0] if is_channel_count(x, dim)]


def size_source(s: State, n: torch.fx.Node) -> tuple[torch.fx.Node | None, int | None]:
    """(tensor, dim) when ``n`` reads one size of a tensor: ``x.size(d)``, ``x.size()[d]``, ``x.shape[d]``."""

    def whole(m: Any) -> torch.fx.Node | None:
        if isinstance(m, torch.fx.Node) and m.op == "call_method" and m.target == "size" and len(m.args) == 1 and not m.kwargs:
            return m.args[0]
        if isinstance(m, torch.fx.Node) and m.op == "call_function" and m.target is getattr and m.args[1] == "shape":
            return m.args[0]
        return None

    if n.op == "call_method" and n.target == "size" and (len(n.args) > 1 or n.kwargs):
        return n.args[0], s.value(arg(n.args, n.kwargs, 1, "dim"))
    if n.op == "call_function" and n.target is operator.getitem and whole(n.args[0]) is not None and isinstance(n.args[1], int):
        return whole(n.args[0]), n.args[1]
    return whole(n), None


@handles(SPLIT)
@family(Family.SHAPE)
def split(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    src, x = s.input_of(node)
    out = on_labels(s, node, args, kwargs)
    if x.dim is not None and x.dim == arg(args, kwargs, 2, "dim", 0) % len(x.shape):
        s.patches.append(Patch(PatchKind.SPLIT, node.name, src.name, x.dim))
    return out


@handles(operator.getitem)
@family(Family.SHAPE)
def getitem(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    obj, index = args
    if not isinstance(obj, (Labels, Param)):
        return obj[index]  # an item of a tuple or dict of tensors (split's pieces, a module's outputs)
    src, x = s.input_of(node)
    tensors: list[Any] = []
    map_aggregate(index, lambda v: tensors.append(v) if isinstance(v, (Labels, Param)) else v)
    if any(isinstance(v, Labels) for v in tensors):
        raise Unsupported(f"node {node.name} indexes with a computed tensor")
    if tensors:  # constant index tensors
        return gather(s, node, x, map_aggregate(index, lambda v: v.tensor if isinstance(v, Param) else v))
    out = on_labels(s, node, args, kwargs)
    if x.dim is not None:
        slice_channels(s, node, src, x)
    return out


@handles(UNBIND)
@family(Family.SHAPE)
def unbind(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """unbind / select: fine along other dims (q, k, v out of one projection); not along the channel dim."""
    src, x = s.input_of(node)
    if x.dim is not None and x.dim == arg(args, kwargs, 1, "dim", 0) % len(x.shape):
        s.freeze(x, f"{target_name(node)} at node {node.name} takes channels one by one")
    return on_labels(s, node, args, kwargs)


@handles(UNFLATTEN)
@family(Family.SHAPE)
def unflatten(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Labels:
    """``unflatten(x, dim, sizes)``: a reshape of one dim; a literal size of the channel dim follows pruning."""
    src, x = s.input_of(node)
    out = on_labels(s, node, args, kwargs, heads=feeds_attention(s, node))
    dim, sizes = arg(args, kwargs, 1, "dim") % len(x.shape), arg(args, kwargs, 2, "sizes")
    k = -1 if out.dim is None else out.dim - dim
    if 0 <= k < len(sizes) and isinstance(node.args[2][k], int) and sizes[k] != -1:
        s.patches.append(Patch(PatchKind.ARG, node.name, node.name, out.dim, path=("args", 2, k)))
    return out


@handles(ATEN_SLICE)
@family(Family.SHAPE)
def aten_slice(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Labels:
    """``aten.slice(x, dim, start, end, step)`` (torch.export's form of ``x[a:b]``): only whole along channels."""
    src, x = s.input_of(node)
    if x.dim is not None and x.dim == arg(args, kwargs, 1, "dim", 0) % len(x.shape):
        start, end, step = arg(args, kwargs, 2, "start"), arg(args, kwargs, 3, "end"), arg(args, kwargs, 4, "step", 1)
        if slice(start, end, step).indices(x.shape[x.dim]) != (0, x.shape[x.dim], 1):
            s.freeze(x, f"slice at node {node.name} takes part of the channels")
    return on_labels(s, node, args, kwargs)


@handles(ATEN_INDEX)
@family(Family.SHAPE)
def aten_index(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Labels:
    """``aten.index(x, [index tensors or None])`` (torch.export's form of ``x[idx]``): a gather, as in getitem."""
    index = [constant(s, n) for n in node.args[1]]
    s.as_labels(args[0], frozenset(d for d, v in enumerate(index) if v is not None))  # a parameter read as a table
    src, x = s.input_of(node)
    if any(v is not None and not isinstance(v, torch.Tensor) for v in index):
        raise Unsupported(f"node {node.name} indexes with a computed tensor")
    return gather(s, node, x, tuple(slice(None) if v is None else v for v in index))


@handles(INDEX_PUT)
@family(Family.SHAPE)
def index_put(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Labels:
    """``x[index] = values`` (``aten.index_put``) along dims other than the channel dim: the channels of
    ``values`` land on the same channels of ``x``. Into a tensor made from sizes alone (``torch.zeros``,
    a detector's pooled features), they become its channels and the channel count there follows pruning."""
    dst, values = s.labels(args[0], node), s.labels(arg(args, kwargs, 2, "values"), node)
    indexed, out_shape = len(node.args[1]), s.shape(node)
    if dst.dim is not None and dst.dim < indexed:
        raise Unsupported(f"node {node.name} writes into the channel dim by index")
    if values.dim is None or values.shape[values.dim] == 1:
        return dst.with_shape(out_shape)
    d = len(out_shape) - (len(values.shape) - values.dim)
    if d < indexed:
        raise Unsupported(f"node {node.name} writes channels into an indexed dim")
    if dst.dim is None:
        made = node.args[0]
        at = 1 if made.args and isinstance(made.args[0], torch.fx.Node) else 0  # x.new_zeros(size) or torch.zeros(size)
        if canonical(made.target) in CREATE and len(made.args) > at and isinstance(made.args[at], (list, tuple)):
            s.patches.append(Patch(PatchKind.ARG, made.name, node.name, d, path=("args", at, d)))
        return Labels(out_shape, d, values.ids)
    if dst.dim != d:
        raise Unsupported(f"node {node.name} writes channels of one dim into another")
    s.uf.union_pairs(dst.ids, values.ids)
    return dst.with_shape(out_shape)


def gather(s: State, node: torch.fx.Node, x: Labels, index: Any) -> Labels:
    """``x[index]`` with constant index tensors, on the labels: a gather along other dims keeps the
    channels (a relative-position table read by position); one along the channel dim freezes them."""
    out = compress(s.uf, s.full(x)[index])
    if x.dim is not None and not (out.dim is not None and torch.equal(out.ids, x.ids)):
        s.freeze(x, f"node {node.name} gathers channels with an index tensor")
    return out


def constant(s: State, n: Any, depth: int = 8) -> Any:
    """The value of a graph argument computed from parameters, buffers and literals alone (an index
    table and its views); an argument that depends on the model's inputs comes back as its node."""
    if not isinstance(n, torch.fx.Node):
        return n
    if (n, depth) not in s.constants:
        s.constants[(n, depth)] = _constant(s, n, depth)
    return s.constants[(n, depth)]


def _constant(s: State, n: torch.fx.Node, depth: int) -> Any:
    if n.op == "get_attr":
        value = s.env[n]
        return value.tensor if isinstance(value, Param) else value
    if n.op != "call_function" or depth == 0:
        return n
    args = map_aggregate(n.args, lambda a: constant(s, a, depth - 1))
    kwargs = map_aggregate(n.kwargs, lambda a: constant(s, a, depth - 1))
    flat: list[Any] = []
    map_aggregate((args, kwargs), lambda a: flat.append(a) if isinstance(a, torch.fx.Node) else a)
    return n if flat else n.target(*args, **kwargs)


def slice_channels(s: State, node: torch.fx.Node, src: torch.fx.Node, x: Labels) -> None:
    """Patch a slice of the channel dim to the kept positions; freeze a single channel or an index list."""
    idx = node.args[1]
    entries = list(enumerate(idx)) if isinstance(idx, tuple) else [(None, idx)]
    if any(e is Ellipsis for _, e in entries):
        k = next(i for i, (_, e) in enumerate(entries) if e is Ellipsis)
        real = sum(e is not None for _, e in entries) - 1
        entries = entries[:k] + [(None, slice(None))] * (len(x.shape) - real) + entries[k + 1:]
    dims = iter(range(len(x.shape)))
    for pos, e in entries:
        if e is None or next(dims) != x.dim:
            continue
        ev = s.value(e)
        if isinstance(ev, slice) and ev == slice(None):
            return
        if isinstance(ev, slice) and ev.step in (None, 1):
            path = ("args", 1) if pos is None else ("args", 1, pos)
            s.patches.append(Patch(PatchKind.SLICE, node.name, src.name, x.dim, path=path))
        elif isinstance(ev, int):
            s.freeze(Labels((1,), 0, x.ids[ev:ev + 1] if ev >= 0 else x.ids[ev:][:1]), f"node {node.name} selects a single channel")
        else:
            s.freeze(x, f"node {node.name} indexes the channel dim")
        return
