"""select: DependencyGraph + MACs target + selector scores -> Plan.

The budget logic lives here, once. Every prunable group loses the same fraction ``s`` of its atoms
(``round(s * width)``, keeping at least ``min_keep``); ``s`` is found by bisection as the smallest
fraction whose MACs fit the target; of the groups that lose more atoms at ``s`` than just below it,
as many as fit (in group order, again by bisection) get those atoms back; while more than 0.5% of the
budget is unused, each group in turn may get one more atom back. Which atoms go is the selector's call: the
lowest-scored first, ties broken by position.
"""

from __future__ import annotations

import torch

from ..errors import TargetUnreachableError
from ..flops import FlopModel
from ..graph import DependencyGraph, Plan

__all__ = ["select", "removed_mask"]


def removed_mask(graph: DependencyGraph, plan: Plan) -> torch.Tensor:
    """Boolean mask over atoms: True where the plan drops the atom."""
    removed = torch.zeros(graph.num_atoms, dtype=torch.bool)
    for gid, keep in plan.keep.items():
        atoms = graph.groups[gid].atoms
        drop = torch.ones(atoms.numel(), dtype=torch.bool)
        drop[list(keep)] = False
        removed[atoms[drop]] = True
    return removed


def select(
    graph: DependencyGraph,
    model: FlopModel,
    target_macs: float,
    scores: dict[int, torch.Tensor],
    min_keep: int = 1,
) -> Plan:
    groups = graph.prunable_groups
    order = {g.id: torch.sort(scores[g.id], descending=True, stable=True).indices for g in groups}
    widths = {g.id: g.width for g in groups}

    def removed_for(counts: dict[int, int]) -> torch.Tensor:
        removed = torch.zeros(graph.num_atoms, dtype=torch.bool)
        for g in groups:
            n = counts[g.id]
            if n:
                removed[g.atoms[order[g.id][widths[g.id] - n:]]] = True
        return removed

    def counts_at(s: float) -> dict[int, int]:
        return {gid: min(w - min_keep, round(s * w)) for gid, w in widths.items()}

    smallest = model.macs(removed_for(counts_at(1.0)))
    if smallest > target_macs:
        raise TargetUnreachableError(
            f"the FLOPs target {2 * target_macs / 1e9:.4g} GFLOPs is out of reach: with every prunable "
            f"group at {min_keep} channel(s) the model still needs {2 * smallest / 1e9:.4g} GFLOPs "
            f"({len(groups)} prunable groups). Ask for at least that, or un-freeze groups (see analyze()).",
            smallest_gflops=2 * smallest / 1e9,
        )
    lo, hi = 0.0, 1.0
    if model.macs(removed_for(counts_at(0.0))) <= target_macs:
        hi = 0.0
    for _ in range(40):
        if hi - lo < 1e-6:
            break
        mid = (lo + hi) / 2
        if model.macs(removed_for(counts_at(mid))) <= target_macs:
            hi = mid
        else:
            lo = mid
    # Between fraction lo (over budget) and hi (within it) some groups lose more atoms; give the
    # first k of them (in group order) their atoms back, with the largest k that fits.
    counts, over = counts_at(hi), counts_at(lo)
    changed = [gid for gid in counts if counts[gid] != over[gid]]

    def give_back(k: int) -> dict[int, int]:
        return {**counts, **{gid: over[gid] for gid in changed[:k]}}

    a, b = 0, len(changed)
    while a < b:
        k = (a + b + 1) // 2
        if model.macs(removed_for(give_back(k))) <= target_macs:
            a = k
        else:
            b = k - 1
    counts = give_back(a)
    removed = removed_for(counts)
    current = model.macs(removed)
    for g in groups:  # one more atom per group while over 0.5% of the budget is unused
        if target_macs - current <= 0.005 * target_macs:
            break
        if counts[g.id]:
            atom = g.atoms[order[g.id][widths[g.id] - counts[g.id]]]
            removed[atom] = False
            macs = model.macs(removed)
            if macs <= target_macs:
                counts[g.id] -= 1
                current = macs
            else:
                removed[atom] = True
    keep = {
        g.id: sorted(order[g.id][: widths[g.id] - counts[g.id]].tolist()) for g in groups if counts[g.id]
    }
    return Plan(keep)
