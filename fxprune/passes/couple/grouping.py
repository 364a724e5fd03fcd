"""From the coupling state to a DependencyGraph: atoms, then groups.

The union-find classes that own parameter slots are the atoms; atoms with the same members (and the
same freeze reasons) form a group.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from ...core.groups import NEVER_REMOVED, DependencyGraph, FlopTerm, Group, Member, Role
from ...core.masks import distinct, owned_cat, unique
from .labels import Labels, Param
from .state import State


def first_appearance_ids(values: torch.Tensor, bound: int | None = None) -> torch.Tensor:
    """Dense ids for the distinct values, numbered in order of first appearance; ``bound``: every value
    is in ``0 .. bound - 1`` (a table of that size replaces sorting all the values)."""
    if bound is None:
        uniq, inverse = torch.unique(values, return_inverse=True)
        bound = uniq.numel()
    else:
        inverse = values
    first = torch.full((bound,), values.numel(), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(values.numel()), "amin")
    present = (first < values.numel()).nonzero().flatten()
    rank = torch.full_like(first, -1)
    rank[present[torch.argsort(first[present])]] = torch.arange(present.numel())
    return rank[inverse]


def mapped(table: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``table[t]`` for each of ``tensors`` (flattened), with one gather for all of them; the same tensor
    object given twice gives the same result object."""
    if not tensors:
        return []
    found, which = distinct(tensors)
    out = torch.split(table[torch.cat(found)], [t.numel() for t in found])
    return [out[k] for k in which]


def finalize(s: State, opaque: tuple[str, ...]) -> DependencyGraph:
    uf = s.uf
    # A parameter index bound to several labels ties them together.
    tied = [(bound[0].reshape(-1), ids.reshape(-1)) for bound in s.slots.values() for ids in bound[1:]]
    if tied:
        uf.union_pairs(torch.cat([a for a, _ in tied]), torch.cat([b for _, b in tied]))
    root = uf.root_table()
    keys = list(s.slots)
    vectors, vector_of = distinct([s.slots[k][0] for k in keys])
    if s.buffer_slots:  # a buffer holds channels where its labels meet a parameter's
        channels = torch.zeros(uf.size, dtype=torch.bool)
        if vectors:
            channels[root[torch.cat(vectors)]] = True
        owner, flat = owned_cat([ids.reshape(-1) for _, _, ids in s.buffer_slots])
        for k in torch.unique(owner[channels[root[flat]]]).tolist():
            name, dim, ids = s.buffer_slots[k]
            s.bind(name, dim, ids, name.rpartition(".")[0] or name, Role.PARAM)
        keys = list(s.slots)
        vectors, vector_of = distinct([s.slots[k][0] for k in keys])
    # Atoms are the roots that own slots, numbered in order of first appearance.
    owner, firsts = owned_cat(vectors)
    ids = first_appearance_ids(root[firsts], uf.size)
    atom_of = torch.full((uf.size,), NEVER_REMOVED, dtype=torch.long)
    atom_of[root[firsts]] = ids
    atom_of = atom_of[root]  # label -> atom
    num_atoms = int(ids.max()) + 1 if ids.numel() else 0

    per_vector = torch.split(ids, [v.numel() for v in vectors])
    member_atoms = {k: per_vector[v] for k, v in zip(keys, vector_of)}
    frozen, texts = freeze_reasons(s, atom_of)
    atom_group = group_ids(owner, ids, vector_of, frozen, num_atoms)
    counts = torch.bincount(atom_group, minlength=int(atom_group.max()) + 1).tolist() if num_atoms else []
    group_atoms = torch.split(torch.argsort(atom_group, stable=True), counts)  # each group's atoms, ascending
    group_members: list[list[Member]] = [[] for _ in group_atoms]
    vector_groups: list[list[int]] = [[] for _ in vectors]
    for v, g in zip(*(t.tolist() for t in _pairs(owner, atom_group[ids], len(group_atoms)))):
        vector_groups[v].append(g)
    for k, v in zip(keys, vector_of):  # each key's groups, keys in order
        for g in vector_groups[v]:
            group_members[g].append(s.members[k])
    leading = [int(atoms[0]) for atoms in group_atoms]  # a group's reasons are its first atom's
    reasons: dict[int, list[str]] = defaultdict(list)
    at = torch.isin(frozen[0], torch.tensor(leading, dtype=torch.long))
    for a, c in zip(frozen[0][at].tolist(), frozen[1][at].tolist()):
        reasons[a].append(texts[c])
    groups = [Group(gid, atoms, tuple(group_members[gid]), tuple(reasons.get(first, ())))
              for gid, (atoms, first) in enumerate(zip(group_atoms, leading))]

    values = {node: s.param_labels.get(v.name, v) if isinstance(v, Param) else v for node, v in s.env.items()}
    labelled = [(node.name, v) for node, v in values.items() if isinstance(v, Labels) and v.dim is not None]
    factors = [f for _, _, fs in s.flop_terms for f in fs]
    atoms = iter(mapped(atom_of, [v.ids for _, v in labelled] + factors))
    tensor_atoms = {name: (v.dim, next(atoms)) for name, v in labelled}
    return DependencyGraph(
        groups=groups,
        member_atoms=member_atoms,
        members=dict(s.members),
        tensor_atoms=tensor_atoms,
        patches=s.patches,
        flop_terms=[FlopTerm(name, macs, tuple(next(atoms) for _ in fs)) for name, macs, fs in s.flop_terms],
        consumers=s.consumers,
        notes=s.notes,
        families=s.families,
        num_atoms=num_atoms,
        opaque=opaque,
        atom_group=atom_group,
        masked_norms=tuple(s.masked_norms),
    )


def freeze_reasons(s: State, atom_of: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], list[str]]:
    """Why atoms are frozen: (atoms, reasons) as two tensors of pairs, each frozen atom with its first three
    reasons (a label's first reason only; reasons in the order they first froze a label), by atom, and
    the reasons' texts; ``atom_of``: the atom of every label."""
    none = torch.empty(0, dtype=torch.long)
    if not s.frozen:
        return (none, none), []
    owner, flat = owned_cat([ids for ids, _ in s.frozen])
    first = torch.full((s.uf.size,), len(s.frozen), dtype=torch.long).scatter_reduce_(0, flat, owner, "amin")
    labels = (first < len(s.frozen)).nonzero().flatten()
    winner = first[labels]  # the first entry that froze each label
    code: dict[str, int] = {}
    for k in torch.unique(winner).tolist():
        code.setdefault(s.frozen[k][1], len(code))
    if not code:
        return (none, none), []
    of_label = torch.tensor([code.get(why, -1) for _, why in s.frozen], dtype=torch.long)[winner]
    atoms = atom_of[labels]
    real = atoms != NEVER_REMOVED
    pairs = unique(atoms[real] * len(code) + of_label[real])  # by atom, then reason
    atom, reason = pairs // len(code), pairs % len(code)
    starts = torch.ones_like(atom, dtype=torch.bool)
    starts[1:] = atom[1:] != atom[:-1]
    run = torch.arange(atom.numel()) - torch.cummax(torch.where(starts, torch.arange(atom.numel()), 0), 0).values
    return (atom[run < 3], reason[run < 3]), list(code)


def group_ids(owner: torch.Tensor, atoms: torch.Tensor, vector_of: list[int], frozen: tuple[torch.Tensor, torch.Tensor],
              num_atoms: int) -> torch.Tensor:
    """Group id of every atom: atoms with the same members and freeze reasons share one; ``atoms[i]`` is
    an atom of label vector ``owner[i]``, member k has vector ``vector_of[k]``, and ``frozen`` pairs
    atoms with their reasons (``freeze_reasons``).

    Members, and reasons, are compared through sums of random 62-bit codes, one per member or reason.
    """
    codes = torch.randint(0, 2**62, (len(vector_of),), generator=torch.Generator().manual_seed(0))
    vector_codes = torch.zeros(max(vector_of, default=-1) + 1, dtype=torch.long)
    vector_codes.index_add_(0, torch.tensor(vector_of, dtype=torch.long), codes)  # a vector's members, summed
    signature = torch.zeros(num_atoms, dtype=torch.long)
    which, atoms = _pairs(owner, atoms, num_atoms)
    signature.index_add_(0, atoms, vector_codes[which])
    if frozen[0].numel():  # tens of thousands of atoms can be frozen (attention tables)
        why = torch.randint(0, 2**62, (int(frozen[1].max()) + 1,), generator=torch.Generator().manual_seed(1))
        signature.index_add_(0, frozen[0], why[frozen[1]])
    return first_appearance_ids(signature)


def _pairs(owner: torch.Tensor, values: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, v) for each distinct pair of ``owner[i] = k``, ``values[i] = v`` (v in ``0 .. size - 1``), sorted
    by k then v, as two tensors: one ``unique`` for what would be one per owner."""
    size = max(size, 1)
    keys = unique(owner * size + values)
    return keys // size, keys % size
