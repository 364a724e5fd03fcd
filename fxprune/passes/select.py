"""select: DependencyGraph + MACs target + selector scores -> Plan.

The budget logic lives here, once. Every prunable group loses the same fraction ``s`` of its atoms
(``round(s * width)``, keeping at least ``min_keep``); ``s`` is found by bisection as the smallest
fraction whose MACs fit the target; then the budget left over is filled by giving atoms back, one group
at a time in group order, while the target still holds. Which atoms go is the selector's call: the
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
    counts = counts_at(hi)
    removed = removed_for(counts)
    for g in groups:  # give back what the budget still allows, best-scored removed atom first
        while counts[g.id] > 0:
            atom = g.atoms[order[g.id][widths[g.id] - counts[g.id]]]
            removed[atom] = False
            if model.macs(removed) > target_macs:
                removed[atom] = True
                break
            counts[g.id] -= 1
    keep = {
        g.id: sorted(order[g.id][: widths[g.id] - counts[g.id]].tolist()) for g in groups if counts[g.id]
    }
    return Plan(keep)
