"""The knapsack selectors: keep the most importance for the cost.

Every channel has an importance (another selector's scores: l1 of its weights, or bn_taylor's loss
estimate) and a cost, what removing it saves in the cost model that the target is counted in: the latency
model's milliseconds for ``speedup=`` / ``target_latency_ms=``, MACs for a FLOPs target. The channels
whose removal loses the least importance per unit of cost saved go first, across all groups: a greedy
knapsack, in steps of the width rule's multiple (a sixteenth of the group when wider), so that every step
saves what the widths the plan may keep save. A step's saving is estimated on the model as it stands after
the steps before it. Importance is normalized per group (divided by the L2 norm of the group's scores), so
that groups compare: a layer's raw norms grow with its fan-in, and with the norm every group's channels
share the same total, spread over more channels in a wider group. No group goes below a quarter of its
width before every group is there (then all shrink at the same pace): a first-order importance says
little of what a group nearly emptied still does.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx

from ..core.flops import FlopModel, total_macs
from ..core.groups import DependencyGraph
from ..core.widths import WidthRule
from .budget import CostModel
from .costaware import greedy_scores
from .datadriven import BNTaylor
from .protocol import Scores, Selector
from .stats import LossFn
from .weights import L1

__all__ = ["Knapsack", "KnapsackBNTaylor", "normalized"]


def normalized(deps: DependencyGraph, importance: Scores) -> Scores:
    """``importance`` divided by each group's L2 norm (a group scored all zeros: every atom 1 / sqrt(width)).
    Scores below zero (a selector's "higher = keep" may be negative) are first shifted to start at zero."""
    out = {}
    for g in deps.prunable_groups:
        s = importance[g.id].to(torch.float64)
        s = s - min(float(s.min()), 0.0)
        norm = float(s.norm())
        out[g.id] = s / norm if norm > 0 else torch.full((g.width,), g.width**-0.5, dtype=torch.float64)
    return out


class Knapsack:
    """Removes the channels that lose the least importance per millisecond (or MAC) saved, across all
    groups (see the module docstring). ``importance``: any selector; default l1 of the weights."""

    name = "knapsack"
    comparable_across_groups = True
    uses_width_rule = True
    uses_cost = True
    STEPS = 16
    FLOOR = 0.25

    def __init__(self, importance: Selector | None = None) -> None:
        self.importance = importance if importance is not None else L1()

    def scores(self, deps: DependencyGraph, gm: torch.fx.GraphModule, rule: WidthRule | None = None, cost: CostModel | None = None) -> Scores:
        return self.rank(deps, gm, self.importance.scores(deps, gm), rule, cost)

    def rank(self, deps: DependencyGraph, gm: torch.fx.GraphModule, importance: Scores, rule: WidthRule | None = None,
             cost: CostModel | None = None) -> Scores:
        """The knapsack's scores for per-atom ``importance`` (higher = keep) in ``cost`` (default: MACs)."""
        flops = FlopModel(deps, total_macs(gm))
        cost = cost if cost is not None else flops
        rule = rule or WidthRule()
        groups = deps.prunable_groups
        value = normalized(deps, importance)
        kinds = deps.atom_kinds
        order = {g.id: torch.sort(value[g.id], stable=True).indices for g in groups}
        size = {}
        for g in groups:
            step = rule.step(g.width, *kinds[g.id])
            size[g.id] = step * max(1, math.ceil(g.width / self.STEPS / step))
        floor = {g.id: max(rule.min_width, math.ceil(self.FLOOR * g.width)) for g in groups}
        per_atom = torch.zeros(deps.num_atoms, dtype=torch.float64)
        for g in groups:
            per_atom[g.atoms] = value[g.id]

        def worth(atoms: torch.Tensor, after: torch.Tensor, now: float) -> tuple[float, float]:
            after_cost = cost.cost(after)
            saved = now - after_cost
            lost = float(per_atom[atoms].sum())
            return (saved / max(lost, 1e-12) if saved > 0 else 0.0), after_cost

        return greedy_scores(deps, flops, order, size, floor, worth, cost.cost(torch.zeros(deps.num_atoms, dtype=torch.bool)))


class KnapsackBNTaylor(Knapsack):
    """``knapsack`` with bn_taylor's importance: ``compile`` takes it from one pass over ``calibration=``
    with ``loss_fn=``; ``prune_iteratively(coarse=True)`` from the gradients of the user's fine-tuning."""

    name = "knapsack_bn_taylor"
    takes_data = True
    takes_loss = True

    def __init__(self, calibration: Any = None, loss_fn: LossFn | None = None) -> None:
        super().__init__(BNTaylor(calibration, loss_fn))

    def untapped_scores(self, deps: DependencyGraph, gm: torch.fx.GraphModule, rule: WidthRule | None = None, cost: CostModel | None = None) -> Scores:
        return self.rank(deps, gm, self.importance.untapped_scores(deps, gm), rule, cost)

    def tap(self, deps: DependencyGraph, gm: torch.fx.GraphModule) -> Any:
        return self.importance.tap(deps, gm)
