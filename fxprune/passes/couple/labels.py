"""Channel labels: the abstract values the coupling pass propagates through a graph.

Every channel a producer creates gets an integer label. A tensor's labels are kept compactly as
``Labels(shape, dim, ids)``: the label of position p is ``ids[p[dim]]``; ``dim=None`` means one label
for the whole tensor. Shape ops run on the materialized label tensor (``full()``) and the result is
compressed back; labels that meet at one position are merged in a union-find.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Labels", "Param", "UnionFind", "compress"]


class UnionFind:
    """Union-find over integer labels, held in a tensor so that whole label tensors merge at once.

    A merge links roots only; a lookup follows parents a few gathers deep and points the labels it looked
    up straight at their roots, so no merge rewrites the whole table. The smallest label of a class is
    its root, whatever the order of merges.
    """

    def __init__(self) -> None:
        self._parent = torch.arange(1024)
        self.size = 0

    def fresh(self, n: int) -> torch.Tensor:
        start, self.size = self.size, self.size + n
        if self.size > self._parent.numel():
            grown = torch.arange(max(self.size, 2 * self._parent.numel()))
            grown[:start] = self._parent[:start]
            self._parent = grown
        return torch.arange(start, self.size)

    def roots(self, t: torch.Tensor) -> torch.Tensor:
        """The root of every label in ``t`` (same shape); ``t``'s labels then point at them directly."""
        parent = self._parent
        r = parent[t]
        if torch.equal(up := parent[r], r):  # most lookups: ``t``'s labels point at their roots already
            return r
        while not torch.equal(up, r):
            r, up = up, parent[up]
        parent[t] = r
        return r

    def union(self, a: int, b: int) -> None:
        self.union_pairs(torch.tensor([a]), torch.tensor([b]))

    def union_pairs(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Merge ``a[i]`` with ``b[i]`` for every i (both flattened, same length).

        Each round links the larger root of every pair to the smaller; where several pairs link one
        root, the smallest wins, and only the pairs that lost go round again."""
        a, b = a.reshape(-1), b.reshape(-1)
        while True:
            ra, rb = self.roots(a), self.roots(b)
            if torch.equal(ra, rb):
                return
            low, high = torch.minimum(ra, rb), torch.maximum(ra, rb)  # a pair already joined links a root to itself
            self._parent.scatter_reduce_(0, high, low, "amin")
            won = self._parent[high]
            lost = won != low
            if not bool(lost.any()):
                return
            a, b = low[lost], won[lost]

    def root_table(self) -> torch.Tensor:
        """The root of every label, ``0 .. size - 1``."""
        return self.roots(torch.arange(self.size))


@dataclass(frozen=True)
class Labels:
    """Labels of one tensor value: position p carries ``ids[p[dim]]`` (``ids[0]`` when dim is None)."""

    shape: tuple[int, ...]
    dim: int | None
    ids: torch.Tensor

    def full(self) -> torch.Tensor:
        if self.dim is None:
            return self.ids[:1].reshape([1] * len(self.shape)).expand(self.shape).contiguous()
        view = [1] * len(self.shape)
        view[self.dim] = -1
        return self.ids.view(view).expand(self.shape).contiguous()

    def with_shape(self, shape: tuple[int, ...]) -> Labels:
        """The same labels on a tensor of another shape (an op that keeps the channel dim in place)."""
        return Labels(tuple(shape), self.dim, self.ids)


@dataclass(frozen=True)
class Param:
    """A parameter or buffer read by a ``get_attr`` node, before it is used as data; ``transposed``: read as
    ``tensor.T`` (a 2-d weight that a matrix product takes as ``x @ weight.T``), ``tensor`` as stored."""

    name: str
    tensor: torch.Tensor
    transposed: bool = False


def compress(uf: UnionFind, t: torch.Tensor, force: frozenset[int] = frozenset(), heads: bool = False,
             shape: tuple[int, ...] | None = None) -> Labels:
    """Turn a full label tensor (of root labels) back into ``Labels``.

    ``shape``: the tensor's shape when ``t`` holds only the dims its labels may vary along, size 1
    elsewhere (it broadcasts to ``shape``); ``t``'s own shape by default.

    Where labels vary along more than one dim, the labels inside each slice of one dim are merged:
    removing channels then removes whole slices of that dim, which is what a later reshape of the
    pruned tensor needs (a channel shuffle's halves, say). ``force`` names dims whose size the program
    computes from the channel count: when labels vary along any other dim, the split must happen
    along a forced dim (the largest), because that is the size that follows pruning at run time.
    Otherwise, for a tensor split into attention ``heads`` (..., heads, head_dim), the heads dim:
    whole heads become atoms, q, k and v of a head together (a single head is one atom). Otherwise the dim
    with the fewest distinct labels per slice is used.
    """
    shape = tuple(t.shape) if shape is None else shape
    if t.numel() == 0:
        return Labels(shape, None, uf.fresh(1))
    varying = [
        d for d in range(t.dim()) if t.shape[d] > 1 and not torch.equal(t, t.narrow(d, 0, 1).expand_as(t))  # size 1: broadcast
    ]
    if force and any(d not in force for d in varying):
        return _merge_slices(uf, t, max(force, key=lambda d: shape[d]), shape)
    if not varying:
        return Labels(shape, None, t.reshape(-1)[:1].clone())
    if len(varying) > 1 and heads and shape[-2] == 1:  # a single head: one atom
        flat = t.reshape(-1)
        uf.union_pairs(flat[:1].expand_as(flat), flat)
        return Labels(shape, None, flat[:1].clone())
    if len(varying) > 1 and heads and t.dim() - 2 in varying:
        return _merge_slices(uf, t, t.dim() - 2, shape)
    if len(varying) > 1:
        return _merge_slices(uf, t, min(varying, key=lambda d: (_distinct_per_slice(t, d), -shape[d])), shape)
    d = varying[0]
    return Labels(shape, d, t.movedim(d, 0).reshape(shape[d], -1)[:, 0].clone())


def _merge_slices(uf: UnionFind, t: torch.Tensor, d: int, shape: tuple[int, ...]) -> Labels:
    """Merge all labels inside each slice of dim ``d``; the result varies along ``d`` only."""
    rows = t.movedim(d, 0).reshape(t.shape[d], -1)
    uf.union_pairs(rows[:, :1].expand_as(rows), rows)
    return Labels(shape, d, rows[:, 0].expand(shape[d]).clone())


def _distinct_per_slice(t: torch.Tensor, d: int) -> float:
    rows = t.movedim(d, 0).reshape(t.shape[d], -1)
    key = torch.arange(rows.shape[0]).unsqueeze(1) * (int(t.max()) + 1) + rows
    return torch.unique(key).numel() / rows.shape[0]
