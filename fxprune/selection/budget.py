"""budget: DependencyGraph + cost target + selector scores -> Plan (how many atoms each group loses, and which).

The budget logic lives here, once, over a *cost model*: anything with ``cost(removed) -> float`` (the
FLOP model's MACs, the latency model's milliseconds), ``describe(value)`` and ``reached(smallest)``.

Every prunable group removes its atoms in one fixed order: the
lowest-scored first, ties broken by position (the last first). A *schedule* maps a fraction ``t`` in
[0, 1] to how many atoms each group removes:

* ``per_group`` (the default): each group removes ``round(t * width)`` atoms;
* ``global``: all atoms of all groups are ranked together and the first ``round(t * N)`` of the ranking
  go (N = number of atoms in prunable groups). The ranking sorts atoms by score, divided by the largest
  |score| of their group so that groups on different scales compare (a group scored all zeros stays 0),
  except for selectors whose scores are comparable as they are (``comparable_across_groups``, e.g.
  gflops_aware's); ties go by the atom's place in its group's order, then by group id.

Every count then obeys the WidthRule: a pruned group keeps at least ``min_width`` atoms and a channel
count that is a multiple of ``round_to`` (of half of it, a quarter..., for groups not wider than that,
so that a narrow group still keeps a width on the fast steps; the nearest allowed count). An atom that
is a block of channels (an attention head) counts all of them. An atom that repeats, one position in
every group of a grouped conv (or in every copy of a repeated tensor), counts once: the per-group width
is what the kernels run at, so such a group keeps a multiple of ``round_to`` atoms, or all of them when
it is not wider (no halving: a grouped conv at 4 channels per group instead of 8 saves FLOPs but hardly
any time), and a RegNet's 8-channel groups stay whole at ``round_to=8`` while the budget goes to the
other groups (a group may always keep all of its atoms). ``t`` is found by
bisection as the smallest fraction whose cost fits the target; of the groups that remove more atoms at
``t`` than just below it, as many as fit (in group order, again by bisection) get those atoms back;
while more than 0.5% of the budget is unused, each group in turn may get one more step back (one atom,
or a multiple's worth). The result never exceeds the target. With ``equal_widths`` (per_group mode
only), the groups that repeat from layer to layer get atoms back together, so they keep equal widths.

``ties`` (a Hugging Face model's config, results/hfconfig.py) are sets of groups whose widths only move
together: a tie of D steps (D divides every group's width) keeps s/D of every group's atoms, s from 1 to
D, so the proportions between them hold; its widest group's count (by the schedule and the WidthRule)
decides s. A tie of one step keeps all its atoms.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..errors import ArgumentError, TargetUnreachableError
from ..core.groups import DependencyGraph, Group, Plan
from ..core.masks import index_within, owned_cat
from ..core.widths import WidthRule

__all__ = ["select", "CostModel", "MODES", "Tie", "repeated_groups"]

MODES = ("per_group", "global")


class CostModel(Protocol):
    def cost(self, removed: torch.Tensor) -> float:
        """The model's cost with the atoms in the boolean mask ``removed`` gone."""
        ...

    def describe(self, value: float) -> str:
        """``value`` with its unit, for messages."""
        ...

    def reached(self, smallest: float) -> dict[str, Any]:
        """Keywords of ``TargetUnreachableError`` for the smallest reachable cost."""
        ...


@dataclass(frozen=True)
class Tie:
    """Groups (ids) whose widths only move together, each keeping s/``steps`` of its atoms (one step: all)."""

    groups: tuple[int, ...]
    steps: int


class _Tied:
    """A tie over its groups: the counts that keep s of its ``steps`` parts of every group."""

    def __init__(self, groups: list[Group], steps: int) -> None:
        self.groups = sorted(groups, key=lambda g: -g.width)
        self.steps = math.gcd(steps, *(g.width for g in groups))

    def counts(self, s: int) -> dict[int, int]:
        s = min(max(s, 1), self.steps)
        return {g.id: g.width - s * g.width // self.steps for g in self.groups}

    def kept_steps(self, counts: dict[int, int]) -> int:
        """s for the widest group's count in ``counts`` (the nearest, at least one step)."""
        lead = self.groups[0]
        return round((lead.width - counts[lead.id]) * self.steps / lead.width)


def _check_scores(groups: list[Group], scores: dict[int, torch.Tensor]) -> None:
    given = [scores.get(g.id) for g in groups]
    if all(isinstance(s, torch.Tensor) and s.shape == (g.width,) for g, s in zip(groups, given)) and (
            not given or bool(torch.isfinite(torch.cat(given)).all())):
        return
    for g, s in zip(groups, given):
        if not isinstance(s, torch.Tensor) or tuple(s.shape) != (g.width,) or not bool(torch.isfinite(s).all()):
            got = f"shape {tuple(s.shape)}" if isinstance(s, torch.Tensor) else type(s).__name__
            raise ArgumentError(
                f"the selector's scores for group {g.id} (first member {g.members[0]}) must be a tensor of "
                f"{g.width} finite numbers, one per atom; got {got}"
            )


def _per_group_schedule(groups: list[Group]) -> Callable[[float], list[int]]:
    return lambda t: [round(t * g.width) for g in groups]


def _global_schedule(groups: list[Group], order: dict[int, torch.Tensor], scores: dict[int, torch.Tensor], comparable: bool) -> Callable[[float], list[int]]:
    """Schedule of the global ranking (see the module docstring): a prefix of one sequence of group indices."""
    if not groups:
        return lambda t: []
    keys, ranks, owners = [], [], []
    for i, g in enumerate(groups):
        s = scores[g.id].to(torch.float64)
        top = s.abs().max()
        if not comparable and top > 0:
            s = s / top
        keys.append(s[order[g.id].flip(0)])
        ranks.append(torch.arange(g.width))
        owners.append(torch.full((g.width,), i))
    key, rank, owner = torch.cat(keys), torch.cat(ranks), torch.cat(owners)
    idx = torch.sort(rank, stable=True).indices
    sequence = owner[idx[torch.sort(key[idx], stable=True).indices]]
    return lambda t: torch.bincount(sequence[: round(t * sequence.numel())], minlength=len(groups)).tolist()


def select(
    deps: DependencyGraph,
    model: CostModel,
    target: float,
    scores: dict[int, torch.Tensor],
    *,
    mode: str = "per_group",
    rule: WidthRule = WidthRule(),
    comparable: bool = False,
    ties: Sequence[Tie] = (),
) -> Plan:
    """The plan whose cost fits ``target`` (see the module docstring); ``comparable``: the scores compare
    across groups as they are (global mode does not normalize them); ``ties``: groups kept in proportion."""
    groups = deps.prunable_groups
    _check_scores(groups, scores)
    order = {g.id: torch.sort(scores[g.id], descending=True, stable=True).indices for g in groups}
    schedule = _per_group_schedule(groups) if mode == "per_group" else _global_schedule(groups, order, scores, comparable)

    kinds = deps.atom_kinds
    by_id = {g.id: g for g in groups}
    tied = [_Tied([by_id[i] for i in t.groups], t.steps) for t in ties]

    at_schedule: dict[tuple[int, ...], dict[int, int]] = {}

    def counts_at(t: float) -> dict[int, int]:
        """Atoms removed per group at fraction ``t``; the bisection's last steps repeat a schedule's counts."""
        key = tuple(schedule(t))
        if key not in at_schedule:
            counts = {g.id: g.width - rule.kept(g.width, n, *kinds[g.id]) for g, n in zip(groups, key)}
            for tie in tied:
                counts.update(tie.counts(tie.kept_steps(counts)))
            at_schedule[key] = counts
        return dict(at_schedule[key])

    # Every group's atoms, worst first: removing n of a group removes those whose place in it is below n
    # (atoms of other groups are never reached).
    owner, worst = owned_cat([g.atoms[order[g.id].flip(0)] for g in groups])
    widths = [g.width for g in groups]
    rank = index_within(owner, widths)
    place = torch.full((deps.num_atoms,), deps.num_atoms, dtype=torch.long).index_put_((worst,), rank)
    fragile = deps.fragile_atoms
    if fragile:  # best atom first, in the selectors' order
        best = torch.zeros(deps.num_atoms, dtype=torch.long).index_put_((worst,), torch.tensor(widths)[owner] - 1 - rank)
        fragile = [a[torch.argsort(best[a], stable=True)] for a in fragile]
    in_fragile, fragile_atoms = owned_cat(fragile)
    fragile_sizes = torch.tensor([len(a) for a in fragile], dtype=torch.long)
    limits = [0] * len(deps.groups)

    def removed_for(counts: dict[int, int]) -> torch.Tensor:
        for g in groups:
            limits[g.id] = counts[g.id]
        removed = place < torch.tensor(limits)[deps.atom_group]
        if fragile:  # never empty a tensor: keep its best atom
            emptied = torch.bincount(in_fragile, weights=removed[fragile_atoms].double(), minlength=len(fragile)) == fragile_sizes
            for k in emptied.nonzero().flatten().tolist():  # in turn: keeping one atom can keep another tensor non-empty
                if bool(removed[fragile[k]].all()):
                    removed[fragile[k][0]] = False
        return removed

    costs: dict[tuple[int, ...], float] = {}

    def cost_of(counts: dict[int, int]) -> float:
        """The cost of removing ``counts`` atoms per group; many fractions of the search give the same counts."""
        key = tuple(counts.values())
        if key not in costs:
            costs[key] = model.cost(removed_for(counts))
        return costs[key]

    smallest = cost_of(counts_at(1.0))
    if smallest > target:
        raise TargetUnreachableError(
            f"the target {model.describe(target)} is out of reach: with every prunable group at its smallest "
            f"allowed width ({rule}) the model still needs {model.describe(smallest)} ({len(groups)} prunable "
            "groups). Ask for at least that, lower min_width/round_to, or un-freeze groups (see analyze()).",
            **model.reached(smallest),
        )
    lo, hi = 0.0, 1.0
    if cost_of(counts_at(0.0)) <= target:
        hi = 0.0
    for _ in range(40):
        if hi - lo < 1e-6:
            break
        mid = (lo + hi) / 2
        if cost_of(counts_at(mid)) <= target:
            hi = mid
        else:
            lo = mid
    # Between fraction lo (over budget) and hi (within it) some groups lose more atoms; give the
    # first k of them (in group order; repeated groups together) their atoms back, with the largest k that fits.
    counts, over = counts_at(hi), counts_at(lo)
    in_ties = {g.id for tie in tied for g in tie.groups}
    free = [g for g in groups if g.id not in in_ties]
    units = [tie.groups for tie in tied] + (repeated_groups(free) if rule.equal_widths else [[g] for g in free])
    tie_of = {id(tie.groups): tie for tie in tied}
    changed = [unit for unit in units if counts[unit[0].id] != over[unit[0].id]]

    def give_back(k: int) -> dict[int, int]:
        return {**counts, **{g.id: over[g.id] for unit in changed[:k] for g in unit}}

    a, b = 0, len(changed)
    while a < b:
        k = (a + b + 1) // 2
        if cost_of(give_back(k)) <= target:
            a = k
        else:
            b = k - 1
    counts = give_back(a)
    removed = removed_for(counts)
    current = model.cost(removed)
    for unit in units:  # one more step per group while over 0.5% of the budget is unused
        if target - current <= 0.005 * target:
            break
        n, w = counts[unit[0].id], unit[0].width
        if n:
            tie = tie_of.get(id(unit))
            fewer = tie.counts(tie.kept_steps(counts) + 1) if tie else {g.id: w - rule.more(w, w - n, *kinds[g.id]) for g in unit}
            atoms = torch.cat([g.atoms[order[g.id][g.width - counts[g.id] : g.width - fewer[g.id]]] for g in unit])
            before = removed[atoms].clone()
            removed[atoms] = False
            cost = model.cost(removed)
            if cost <= target:
                counts.update(fewer)
                current = cost
            else:
                removed[atoms] = before
    gone = {g.id: removed[g.atoms] for g in groups}
    return Plan({gid: (~mask).nonzero().flatten().tolist() for gid, mask in gone.items() if bool(mask.any())})


def repeated_groups(groups: list[Group]) -> list[list[Group]]:
    """``groups`` gathered into sets that repeat from layer to layer: the same width and the same members
    once layer indices (the numbers in ``layers.3.mlp``) are set aside; in order of their first group."""
    found: dict[Any, list[Group]] = {}
    for g in groups:
        members = frozenset((re.sub(r"(?<=\.)\d+(?=\.)", "#", m.name), m.dim) for m in g.members)
        found.setdefault((g.width, members), []).append(g)
    return list(found.values())
