"""Which channel atoms a plan removes, and which positions of a tensor or parameter dim it keeps."""

from __future__ import annotations

import array
import functools
import itertools
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch

from .groups import NEVER_REMOVED, DependencyGraph, Plan

__all__ = ["removed_mask", "kept_mask", "Layout", "Kept", "owned_cat", "index_within", "distinct", "unique", "atom_kinds", "fragile_atoms"]


def removed_mask(deps: DependencyGraph, plan: Plan) -> torch.Tensor:
    """Boolean mask over atoms: True where the plan drops the atom. The last plan's mask is remembered on
    ``deps``: a compile asks for it three times (the target's check, the rewrite, the result's record)."""
    lists = all(type(k) is list for k in plan.keep.values())  # so that == compares them element by element
    last = deps.last_removed
    if lists and last is not None and last[0] == plan.keep:
        return last[1].clone()
    removed = _removed_mask(deps, plan)
    if lists:
        deps.last_removed = ({g: list(k) for g, k in plan.keep.items()}, removed.clone())
    return removed


def _removed_mask(deps: DependencyGraph, plan: Plan) -> torch.Tensor:
    removed = torch.zeros(deps.num_atoms, dtype=torch.bool)
    if not plan.keep:
        return removed
    atoms = [deps.groups[gid].atoms for gid in plan.keep]
    starts = torch.tensor(list(itertools.accumulate((a.numel() for a in atoms[:-1]), initial=0)), dtype=torch.long)
    positions = array.array("q", list(itertools.chain.from_iterable(plan.keep.values())))  # thousands of ints: torch.tensor takes 4x as long
    kept = torch.frombuffer(positions, dtype=torch.long) if positions else torch.empty(0, dtype=torch.long)
    atoms = torch.cat(atoms)
    removed[atoms] = True
    removed[atoms[kept + starts.repeat_interleave(torch.tensor([len(k) for k in plan.keep.values()], dtype=torch.long))]] = False
    return removed


def kept_mask(removed: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:
    """For positions whose atoms are ``atoms``: True where the position stays (``NEVER_REMOVED`` always does)."""
    never = atoms == NEVER_REMOVED
    return never | ~removed[atoms.masked_fill(never, 0)]


class Layout:
    """Where the atom vectors of a mapping (key -> 1-D atoms; a graph has hundreds) sit in one
    concatenation: the half of ``Kept`` that no plan changes, made once per graph (``DependencyGraph``'s
    layouts) and shared by its rewrites, reports and the candidates of a latency search."""

    def __init__(self, atoms: Mapping[Hashable, torch.Tensor]) -> None:
        self.keys = list(atoms)
        vectors, self.vector_of = distinct([atoms[k] for k in self.keys])
        self.sizes = [v.numel() for v in vectors]
        self.owner, flat = owned_cat(vectors)
        self.never = flat == NEVER_REMOVED
        self.flat = flat.masked_fill(self.never, 0)
        self.within = index_within(self.owner, self.sizes)
        self.vector: dict[Hashable, int] = dict(zip(self.keys, self.vector_of))
        self.size: dict[Hashable, int] = {k: self.sizes[v] for k, v in self.vector.items()}
        self.start = list(itertools.accumulate(self.sizes, initial=0))
        self._last: tuple[torch.Tensor, Kept] | None = None

    def kept(self, removed: torch.Tensor) -> Kept:
        """``Kept(removed, self)``, remembered for the last mask asked for: a compile's rewrite and report ask
        for the same plan's (0.5 ms each on ShuffleNetV2). Read-only, as every ``Kept``."""
        last = self._last
        if last is None or last[0].shape != removed.shape or not torch.equal(last[0], removed):
            last = self._last = (removed.clone(), Kept(removed, self))
        return last[1]


class Kept:
    """What a plan keeps of many atom vectors, computed at once: for each key of ``atoms`` (a mapping of
    1-D atom tensors, or its ``Layout``), the kept mask (``kept_mask``), the kept positions, how many and
    of how many. Slices of one tensor, cut only when asked for: a tensor op costs microseconds, whatever its size."""

    def __init__(self, removed: torch.Tensor, atoms: Mapping[Hashable, torch.Tensor] | Layout) -> None:
        layout = atoms if isinstance(atoms, Layout) else Layout(atoms)
        self._mask = layout.never | ~removed[layout.flat]
        at = self._mask.nonzero().flatten()  # once for both gathers
        counts = torch.bincount(layout.owner[at], minlength=len(layout.sizes)).tolist()
        self._positions = layout.within[at]
        self._vector, self._starts = layout.vector, layout.start  # the layout's, shared (no reference back to it)
        self._counts, self._offsets = counts, list(itertools.accumulate(counts, initial=0))
        self.size = layout.size
        self.count: dict[Hashable, int] = {k: counts[v] for k, v in layout.vector.items()}

    def mask(self, key: Hashable) -> torch.Tensor:
        start = self._starts[self._vector[key]]
        return self._mask[start:start + self.size[key]]

    def positions(self, key: Hashable) -> torch.Tensor:
        return self._pieces[self._vector[key]]

    @functools.cached_property
    def _pieces(self) -> tuple[torch.Tensor, ...]:
        """The kept positions of every atom vector, cut in one call (a third of the time of a slice each)."""
        return torch.split(self._positions, self._counts)

    def lists(self, keys: list[Hashable]) -> list[list[int]]:
        """The kept positions of each of ``keys`` as lists, with one conversion for all."""
        flat = self._positions.tolist()
        return [flat[self._offsets[self._vector[k]]:self._offsets[self._vector[k]] + self.count[k]] for k in keys]

    def pruned(self) -> list[Hashable]:
        """The keys that lose some positions."""
        return [k for k, n in self.count.items() if n < self.size[k]]


def owned_cat(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.cat`` of 1-D ``tensors`` (of ids: none gives an empty long tensor) and, for each element, the
    index of the tensor it came from: how the passes work over every member or tensor of a graph at once."""
    if not tensors:
        return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    owner = torch.repeat_interleave(torch.arange(len(tensors)), torch.tensor([t.numel() for t in tensors], dtype=torch.long))
    return owner, torch.cat(list(tensors))


def index_within(owner: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """For each element of an ``owned_cat`` (its ``owner``, the tensors' ``sizes``), its index in its own tensor."""
    starts = torch.tensor(list(itertools.accumulate(sizes[:-1], initial=0)), dtype=torch.long)
    return torch.arange(owner.numel()) - starts[owner]


def unique(keys: torch.Tensor, **kwargs: bool) -> Any:
    """``torch.unique(keys, **kwargs)``; ``torch.unique_consecutive`` where ``keys`` are sorted already, as
    the keys made from a graph's atom vectors in ``owned_cat`` order mostly are (no sort: EfficientNet-B0's
    32k (tensor, atom) keys in 16 us against 280)."""
    if keys.numel() < 2 or bool((keys[1:] >= keys[:-1]).all()):
        return torch.unique_consecutive(keys, **kwargs)
    return torch.unique(keys, **kwargs)


def distinct(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
    """The distinct tensor objects among ``tensors`` (flattened) and, for each of ``tensors``, the index
    of its own: the coupling pass gives one atom vector to many parameters and tensors (a conv's output
    channels to its weight, its bias, the next norm's four tensors and the activations between), so the
    work per vector need not be done per parameter."""
    index: dict[int, int] = {}
    found: list[torch.Tensor] = []
    which = []
    for t in tensors:
        k = index.setdefault(id(t), len(found))  # every tensor is alive for the call: ids are unique
        if k == len(found):
            found.append(t if t.dim() == 1 else t.reshape(-1))
        which.append(k)
    return found, which


def atom_kinds(deps: DependencyGraph) -> dict[int, tuple[int, bool]]:
    """For each group, how many output channels its atom stands for (1, or the most indices per atom in a
    member's dim 0: the output dim of weights, the only dim of biases and norm parameters) and whether
    it repeats: in some member more than once, and nowhere at two neighbouring indices (a position in
    every group of a grouped conv, not a head's block of channels). Read as ``deps.atom_kinds``."""
    n = max(deps.num_atoms, 1)
    per_atom = torch.ones(n, dtype=torch.long)
    block = torch.zeros(n, dtype=torch.bool)
    firsts, _ = distinct([atoms for (_, dim), atoms in deps.member_atoms.items() if dim == 0])  # all members at once
    if firsts:
        owner, ids = owned_cat(firsts)
        at = index_within(owner, [a.numel() for a in firsts])
        real = ids >= 0
        if not bool(real.all()):
            ids, owner, at = ids[real], owner[real], at[real]
        pairs, counts = unique(owner * n + ids, return_counts=True)
        per_atom = per_atom.scatter_reduce(0, pairs % n, counts, "amax")
        block[ids[1:][(owner[1:] == owner[:-1]) & (at[1:] == at[:-1] + 1) & (ids[1:] == ids[:-1])]] = True
    repeats = ((per_atom > 1) & ~block)[: deps.num_atoms].long()
    per_group = torch.ones(len(deps.groups), dtype=torch.long).scatter_reduce(0, deps.atom_group, per_atom[: deps.num_atoms], "amax")
    repeated = torch.zeros(len(deps.groups), dtype=torch.long).scatter_reduce(0, deps.atom_group, repeats, "amax")
    widths, repeating = per_group.tolist(), repeated.tolist()
    return {g.id: (widths[g.id], bool(repeating[g.id])) for g in deps.groups}


def fragile_atoms(deps: DependencyGraph) -> list[torch.Tensor]:
    """The atoms of each tensor that a plan could empty: one that holds only part of every group it
    touches (a split piece, a slice), all prunable; each set once. Read as ``deps.fragile_atoms``."""
    width = torch.zeros(len(deps.groups), dtype=torch.long)  # 0 for groups no plan prunes
    for g in deps.prunable_groups:
        width[g.id] = g.width
    entries, _ = distinct([atoms for _, atoms in deps.tensor_atoms.values() if atoms.numel()])
    if not entries:
        return []
    n, num_groups = max(deps.num_atoms, 1), len(deps.groups)
    owner, atoms = owned_cat(entries)
    untracked = torch.zeros(len(entries), dtype=torch.bool).index_fill_(0, owner[atoms < 0], True)
    pairs = unique((owner * n + atoms.clamp(min=0))[~untracked[owner]])  # each atom once per tensor
    entry, atom = pairs // n, pairs % n
    cells, held = unique(entry * num_groups + deps.atom_group[atom], return_counts=True)  # atoms per (tensor, group)
    whole = torch.zeros(len(entries), dtype=torch.bool).index_fill_(0, cells[width[cells % num_groups] <= held] // num_groups, True)
    found: dict[tuple[int, ...], torch.Tensor] = {}
    per_entry = torch.split(atom, torch.bincount(entry, minlength=len(entries)).tolist())  # pairs are sorted by entry
    for e in (~untracked & ~whole).nonzero().flatten().tolist():  # no group whole here
        found.setdefault(tuple(per_entry[e].tolist()), per_entry[e])
    return list(found.values())
