"""Rules for shape ops: the op itself runs on the labels.

``on_labels`` materializes the labels of every tensor argument (``Labels.full``), calls the very op
on them and compresses the result back (``labels.compress``), so view, permute, cat, stack, flip,
pixel_shuffle, tile ... need no rule of their own. Ops that only move, merge or join dims (permute,
transpose, unsqueeze, flatten, cat), reshape one (view, reshape) or cut one into pieces (split, chunk,
tensor_split) are done on the compact labels when they can be: the same result without building the
label tensor. Channel shuffle has a rule on the labels of its channels; roll adds its own checks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import TensorMetadata

from ...core import metakeys as keys
from ...core.fxutil import arg
from ...core.groups import Family
from ...core.optable import SHAPE_FUNCS, SHAPE_METHODS
from .labels import Labels, Param, compress
from .state import State, Unsupported, family, handles, target_name

Moved = tuple[int, torch.Tensor] | None  # (new dim, ids) of a tensor whose labels only moved, or None


@handles(nn.Flatten, nn.PixelShuffle, nn.PixelUnshuffle, SHAPE_FUNCS, SHAPE_METHODS, by_name=("_unsqueeze", "_squeeze"))
@family(Family.SHAPE)
def shape_op(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Any op that only rearranges, repeats or joins positions."""
    return weight_transposed(s, node, args, kwargs) or on_labels(s, node, args, kwargs)


@handles(getattr)
@family(Family.SHAPE)
def attribute(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``x.T`` and ``x.mT`` as symbolic tracing records them (``getattr(x, "T")``): dims reversed, or the last two swapped."""
    if len(args) != 2 or args[1] not in ("T", "mT"):
        raise Unsupported(f"attribute {args[1:2]} of a tensor at node {node.name}")
    if (w := weight_transposed(s, node, args, kwargs)) is not None:
        return w
    x = s.labels(args[0], node)
    if x.dim is None:
        return x.with_shape(s.shape(node))
    return Labels(s.shape(node), *(reverse(x, (), {}) if args[1] == "T" else transpose(x, (-2, -1), {})))


def weight_transposed(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Param | None:
    """A 2-d parameter transposed (``weight.T``, ``.mT``, ``.t()``, ``transpose(0, 1)``, ``permute(1, 0)``) for matrix products
    alone (``x @ weight.T``): kept a ``Param`` read transposed, so that the product binds it as a linear layer's weight."""
    w = args[0] if args else None
    if not isinstance(w, Param) or w.tensor.dim() != 2 or w.name in s.param_labels:
        return None
    name, rest = target_name(node), list(args[1:]) + list(kwargs.values())
    swaps = (name in ("t", "numpy_T") or (name == "getattr" and rest in (["T"], ["mT"]))
             or (name in ("transpose", "swapaxes") and {d % 2 for d in rest} == {0, 1})
             or (name == "permute" and [d % 2 for d in (rest[0] if len(rest) == 1 else rest)] == [1, 0]))
    if not swaps or not node.users or any(target_name(u) not in ("matmul", "mm", "addmm") or u.args[-1 if target_name(u) != "addmm" else 2] is not node
                                          for u in node.users):
        return None
    return Param(w.name, w.tensor, not w.transposed)


def on_labels(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any],
              force: frozenset[int] = frozenset(), heads: bool = False) -> Any:
    """``node``'s op run on the labels of its arguments; ``force`` and ``heads`` as in ``compress``."""
    fast = (moved(s, node, args, kwargs) or reshaped(s, node, args, force, heads)
            or (None if force or heads else pieces(s, node, args, kwargs)))
    if fast is not None:
        return fast

    def full(v: Any) -> Any:
        v = s.as_labels(v)
        return s.full(v) if isinstance(v, Labels) else v

    result = callee(s, node)(*map_aggregate(args, full), **map_aggregate(kwargs, full))
    return map_aggregate(result, lambda r: compress(s.uf, r, force, heads) if isinstance(r, torch.Tensor) else r)


def callee(s: State, node: torch.fx.Node) -> Callable[..., Any]:
    """What ``node`` calls: its module, its function, or its method of the first argument."""
    mod = s.module(node)
    if mod is not None:
        return mod
    if node.op == "call_function":
        return node.target
    return lambda self, *a, **k: getattr(self, node.target)(*a, **k)


def moved(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Labels | None:
    """The labels of an op that only moves, merges or joins dims; None: materialize instead."""
    meta = node.meta.get(keys.TENSOR_META)
    if not isinstance(meta, TensorMetadata):
        return None
    out_shape = tuple(meta.shape)
    mod = s.module(node)
    if mod is not None and not isinstance(mod, nn.Flatten):
        return None
    name = "flatten" if mod is not None else target_name(node)
    if name in ("cat", "concat", "concatenate"):
        return cat(s, args, kwargs, out_shape)
    x = s.as_labels(args[0]) if args else None
    if not isinstance(x, Labels):
        return None
    if x.dim is None:
        return Labels(out_shape, None, x.ids)
    move = MOVES.get(name)
    found = move(x, (mod.start_dim, mod.end_dim) if mod is not None else args[1:], kwargs) if move else None
    if found is None or out_shape[found[0]] != found[1].numel():
        return None
    return Labels(out_shape, *found)


def reshaped(s: State, node: torch.fx.Node, args: tuple[Any, ...], force: frozenset[int], heads: bool) -> Labels | None:
    """The labels of a view or reshape of a tensor whose labels vary along one dim, built only over the
    output dims its channel index depends on (size 1 elsewhere): a window partition of a 56x56 map
    would otherwise materialize and compress every position. None: materialize instead."""
    meta = node.meta.get(keys.TENSOR_META)
    x = s.as_labels(args[0]) if args else None
    if target_name(node) not in ("view", "reshape") or not isinstance(meta, TensorMetadata) or not isinstance(x, Labels) or x.dim is None:
        return None
    out = tuple(meta.shape)
    if math.prod(out) != math.prod(x.shape) or math.prod(out) == 0:
        return None
    post, c, n = math.prod(x.shape[x.dim + 1:]), x.shape[x.dim], len(out)
    # Channel of flat position f: (f // post) % c. Trailing dims whose sizes multiply to a divisor of
    # post, and leading dims whose stride is a multiple of post * c, leave it unchanged.
    b = n
    while b > 0 and post % math.prod(out[b - 1:]) == 0:
        b -= 1
    a = 0
    while a < b and math.prod(out[a + 1:]) % (post * c) == 0:
        a += 1
    roots, inner = s.uf.roots(x.ids), math.prod(out[a:b])
    if inner != c or math.prod(out[b:]) != post:  # else position f of dims a..b-1 is channel f (a channel shuffle's view)
        roots = roots[torch.arange(inner).mul_(math.prod(out[b:])).div_(post, rounding_mode="floor").remainder_(c)]
    small = roots.view([1] * a + list(out[a:b]) + [1] * (n - b))
    return compress(s.uf, small, force, heads, out)


def pieces(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Labels, ...] | None:
    """The labels of a split, chunk or tensor_split: consecutive pieces of one dim, cut from the compact
    labels, as ``compress`` makes them from the materialized pieces (a channel shuffle block splits maps
    of 100k positions). None: materialize instead."""
    metas = node.meta.get(keys.TENSOR_META)
    x = s.as_labels(args[0]) if args else None
    if (target_name(node) not in ("split", "chunk", "tensor_split") or not isinstance(metas, (tuple, list)) or not isinstance(x, Labels)
            or not all(isinstance(m, TensorMetadata) and len(m.shape) == len(x.shape) and m.shape.numel() for m in metas)):
        return None
    d = arg(args, kwargs, 2, "dim", 0) % len(x.shape)
    if sum(m.shape[d] for m in metas) != x.shape[d] or any(m.shape[:d] + m.shape[d + 1:] != x.shape[:d] + x.shape[d + 1:] for m in metas):
        return None
    ids, start, out = s.uf.roots(x.ids), 0, []
    for m in metas:
        piece = ids[start:start + m.shape[d]] if x.dim == d else ids
        start += m.shape[d]
        varies = x.dim is not None and m.shape[x.dim] > 1 and not bool((piece == piece[0]).all())
        out.append(Labels(tuple(m.shape), x.dim, piece.clone()) if varies else Labels(tuple(m.shape), None, piece[:1].clone()))
    return tuple(out)


def permute(x: Labels, rest: tuple[Any, ...], kwargs: dict[str, Any]) -> Moved:
    dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest or kwargs.get("dims")
    if dims is None:
        return None
    return [k % len(x.shape) for k in dims].index(x.dim), x.ids


def transpose(x: Labels, rest: tuple[Any, ...], kwargs: dict[str, Any]) -> Moved:
    a, b = arg(rest, kwargs, 0, "dim0"), arg(rest, kwargs, 1, "dim1")
    if a is None or b is None:
        return None
    a, b, d = a % len(x.shape), b % len(x.shape), x.dim
    return (b if d == a else a if d == b else d), x.ids


def t(x: Labels, rest: tuple[Any, ...], kwargs: dict[str, Any]) -> Moved:
    return (1 - x.dim if len(x.shape) == 2 else x.dim), x.ids


def reverse(x: Labels, rest: tuple[Any, ...], kwargs: dict[str, Any]) -> Moved:
    """``Tensor.T`` (aten ``numpy_T``): every dim reversed."""
    return len(x.shape) - 1 - x.dim, x.ids


def unsqueeze(x: Labels, rest: tuple[Any, ...], kwargs: dict[str, Any]) -> Moved:
    k = arg(rest, kwargs, 0, "dim") % (len(x.shape) + 1)
    return x.dim + (k <= x.dim), x.ids


def flatten(x: Labels, rest: tuple[Any, ...], kwargs: dict[str, Any]) -> Moved:
    n, d = len(x.shape), x.dim
    start, end = arg(rest, kwargs, 0, "start_dim", 0) % n, arg(rest, kwargs, 1, "end_dim", -1) % n
    if d < start:
        return d, x.ids
    if d > end:
        return d - (end - start), x.ids
    inner = math.prod(x.shape[d + 1:end + 1])
    return start, x.ids.repeat_interleave(inner).repeat(math.prod(x.shape[start:d]))


MOVES: dict[str, Callable[[Labels, tuple[Any, ...], dict[str, Any]], Moved]] = {
    "permute": permute, "transpose": transpose, "swapaxes": transpose, "t": t, "numpy_T": reverse, "unsqueeze": unsqueeze,
    "flatten": flatten,
}


def cat(s: State, args: tuple[Any, ...], kwargs: dict[str, Any], out_shape: tuple[int, ...]) -> Labels | None:
    """Concatenation on compact labels: along the channel dim, or of tensors with the same labels."""
    labs = [s.as_labels(v) for v in arg(args, kwargs, 0, "tensors", ())]
    labs = [lab for lab in labs if not (isinstance(lab, Labels) and lab.shape == (0,))]  # cat skips 1-d empty tensors
    if not labs or not all(isinstance(lab, Labels) for lab in labs):
        return None
    dim = arg(args, kwargs, 1, "dim", kwargs.get("axis", 0)) % len(out_shape)
    if all(lab.dim in (dim, None) for lab in labs):
        ids = torch.cat([lab.ids if lab.dim == dim else lab.ids[:1].expand(lab.shape[dim]) for lab in labs])
        same = ids.numel() > 0 and bool((ids == ids[0]).all())  # no ids: the result is empty along dim
        return Labels(out_shape, None, ids[:1]) if same else Labels(out_shape, dim, ids)
    first = labs[0]
    if all(lab.dim == first.dim and torch.equal(s.uf.roots(lab.ids), s.uf.roots(first.ids)) for lab in labs):
        return Labels(out_shape, first.dim, first.ids)
    return None


@handles(nn.ChannelShuffle, F.channel_shuffle)  # torch.channel_shuffle is the same function
@family(Family.SHAPE)
def shuffle(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Labels:
    """Channel j of the output is channel (j % groups) * (C / groups) + j // groups of the input: the
    ``groups`` channels that land side by side go together (one atom), so C stays a multiple of groups.
    Done on the channel labels alone, as a view to (groups, C / groups), a transpose and a flatten of the
    whole label tensor would."""
    mod = s.module(node)
    groups = mod.groups if mod is not None else arg(args, kwargs, 1, "groups")
    x = s.labels(arg(args, kwargs, 0, "input"), node)
    if x.dim is None:
        return x
    if x.dim != 1:
        s.freeze(x, f"channel shuffle at node {node.name} expects channels on dim 1")
        return x
    table = s.uf.roots(x.ids).view(groups, -1)  # row k: the channels of group k
    first = table[0].expand_as(table)
    if not torch.equal(table, first):
        s.uf.union_pairs(first, table)
    ids = table[0].repeat_interleave(groups)
    return Labels(x.shape, None, ids[:1].clone()) if bool((ids == ids[0]).all()) else Labels(x.shape, 1, ids)


@handles(torch.roll, "roll")
@family(Family.SHAPE)
def roll(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Rolling along the channel dim (or the flattened tensor) would move channels: frozen."""
    x = s.labels(arg(args, kwargs, 0, "input"), node)
    dims = arg(args, kwargs, 2, "dims")
    dims = [] if dims is None else [dims] if isinstance(dims, int) else list(dims)
    if x.dim is not None and (not dims or x.dim in [d % len(x.shape) for d in dims]):
        s.freeze(x, f"roll along the channel dim at node {node.name}")
    return on_labels(s, node, args, kwargs)
