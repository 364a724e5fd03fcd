"""From the coupling state to a DependencyGraph: atoms, then groups.

The union-find classes that own parameter slots are the atoms; atoms with the same members (and the
same freeze reasons) form a group.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch

from ...core.groups import NEVER_REMOVED, DependencyGraph, FlopTerm, Group, Member, Role
from ...core.masks import owned_cat
from .labels import Labels, Param
from .state import State


def first_appearance_ids(values: torch.Tensor) -> torch.Tensor:
    """Dense ids for the distinct values, numbered in order of first appearance."""
    uniq, inverse = torch.unique(values, return_inverse=True)
    first = torch.full((uniq.numel(),), values.numel(), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(values.numel()), "amin")
    rank = torch.empty_like(first)
    rank[torch.argsort(first)] = torch.arange(first.numel())
    return rank[inverse]


def finalize(s: State, opaque: tuple[str, ...]) -> DependencyGraph:
    uf = s.uf
    # A parameter index bound to several labels ties them together.
    for bound in s.slots.values():
        for ids in bound[1:]:
            uf.union_pairs(bound[0], ids)
    root = uf.root_table()
    channels = torch.zeros(uf.size, dtype=torch.bool)
    for bound in s.slots.values():
        channels[root[bound[0]]] = True
    for name, dim, ids in s.buffer_slots:  # a buffer holds channels where its labels meet a parameter's
        if channels[root[ids]].any():
            s.bind(name, dim, ids, name.rpartition(".")[0] or name, Role.PARAM)
    keys = list(s.slots)
    # Atoms are the roots that own slots, numbered in order of first appearance.
    slot_roots = torch.cat([root[s.slots[k][0]] for k in keys]) if keys else torch.empty(0, dtype=torch.long)
    ids = first_appearance_ids(slot_roots)
    atom_of = torch.full((uf.size,), NEVER_REMOVED, dtype=torch.long)
    atom_of[slot_roots] = ids
    num_atoms = int(ids.max()) + 1 if ids.numel() else 0

    def to_atoms(ids: torch.Tensor) -> torch.Tensor:
        return atom_of[root[ids]]

    member_atoms = {k: to_atoms(s.slots[k][0]) for k in keys}
    reasons = freeze_reasons(s, to_atoms)
    atom_group = group_ids(member_atoms, reasons, num_atoms)
    group_atoms: list[list[int]] = [[] for _ in range(int(atom_group.max()) + 1 if num_atoms else 0)]
    for a, g in enumerate(atom_group.tolist()):
        group_atoms[g].append(a)
    group_members: list[list[Member]] = [[] for _ in group_atoms]
    which, where = _pairs([atom_group[member_atoms[key]] for key in keys], len(group_atoms))
    for k, g in zip(which.tolist(), where.tolist()):  # each key's groups, keys in order
        group_members[g].append(s.members[keys[k]])
    groups = [
        Group(gid, torch.tensor(atoms, dtype=torch.long), tuple(group_members[gid]), tuple(reasons.get(atoms[0], ())))
        for gid, atoms in enumerate(group_atoms)
    ]

    values = {node: s.param_labels.get(v.name, v) if isinstance(v, Param) else v for node, v in s.env.items()}
    tensor_atoms = {node.name: (v.dim, to_atoms(v.ids)) for node, v in values.items() if isinstance(v, Labels) and v.dim is not None}
    return DependencyGraph(
        groups=groups,
        member_atoms=member_atoms,
        members=dict(s.members),
        tensor_atoms=tensor_atoms,
        patches=s.patches,
        flop_terms=[FlopTerm(name, macs, tuple(to_atoms(f) for f in fs)) for name, macs, fs in s.flop_terms],
        consumers=s.consumers,
        notes=s.notes,
        families=s.families,
        num_atoms=num_atoms,
        opaque=opaque,
        atom_group=atom_group,
        masked_norms=tuple(s.masked_norms),
    )


def freeze_reasons(s: State, to_atoms: Callable[[torch.Tensor], torch.Tensor]) -> dict[int, list[str]]:
    """Why each frozen atom is frozen (its first three reasons; a label's first reason only)."""
    reasons: dict[int, list[str]] = defaultdict(list)
    by_reason: dict[str, list[torch.Tensor]] = defaultdict(list)
    seen = torch.zeros(s.uf.size, dtype=torch.bool)
    for ids, why in s.frozen:
        fresh = ids[~seen[ids]]
        seen[fresh] = True
        if fresh.numel():
            by_reason[why].append(fresh)
    for why, labs in by_reason.items():
        for a in torch.unique(to_atoms(torch.cat(labs))).tolist():
            if a != NEVER_REMOVED and len(reasons[a]) < 3:
                reasons[a].append(why)
    return reasons


def group_ids(member_atoms: dict[tuple[str, int], torch.Tensor], reasons: dict[int, list[str]], num_atoms: int) -> torch.Tensor:
    """Group id of every atom: atoms with the same members and freeze reasons share one.

    Members are compared through a sum of random 62-bit codes, one per member.
    """
    codes = torch.randint(0, 2**62, (len(member_atoms),), generator=torch.Generator().manual_seed(0))
    signature = torch.zeros(num_atoms, dtype=torch.long)
    which, atoms = _pairs(list(member_atoms.values()), num_atoms)
    signature.index_add_(0, atoms, codes[which])
    if reasons:  # one vectorized add: tens of thousands of atoms can be frozen (attention tables)
        frozen = torch.tensor(list(reasons), dtype=torch.long)
        signature.index_add_(0, frozen, torch.tensor([hash(tuple(r)) % 2**62 for r in reasons.values()], dtype=torch.long))
    return first_appearance_ids(signature)


def _pairs(values: list[torch.Tensor], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, v) for each distinct value v of ``values[k]`` (all in ``0 .. size - 1``), sorted by k then v, as
    two tensors: one ``torch.unique`` for what would be one per tensor."""
    if not values:
        return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    size = max(size, 1)
    owner, flat = owned_cat(values)
    keys = torch.unique(owner * size + flat)
    return keys // size, keys % size
