"""Selectors that rank by cost instead of importance: ``gflops_aware`` and ``latency_aware`` shrink groups
at a rate proportional to what one of their channels costs (MACs or measured milliseconds), and
``latency_per_flop`` removes channels where they save the most milliseconds per FLOP."""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.fx

from ..core import metakeys as keys
from ..core.flops import FlopModel, total_macs
from ..core.groups import DependencyGraph
from ..core.widths import WidthRule
from ..latency.costmodel import LatencyModel
from ..latency.cache import TimingCache
from ..latency.timing import Setting
from .protocol import Scores

__all__ = ["GflopsAware", "LatencyAware", "LatencyPerFlop", "shrink_order", "greedy_scores", "RATE_CAP"]


RATE_CAP = 2.0
"""How much faster than the average group the costliest group may shrink (and the cheapest slower)."""


def shrink_order(deps: DependencyGraph, saving: dict[int, float]) -> Scores:
    """Ranking-free scores, comparable across groups, from each group's saving per removed atom.

    Every group shrinks as if it decayed at a rate proportional to its saving per atom (relative to the
    mean over groups, capped at ``RATE_CAP`` times faster or slower): its ``k``-th atom (from the last
    position) goes at time ``-ln(1 - k / width) / rate``. So the groups that save the most per atom shrink
    first and fastest, every group shrinks more slowly as it thins, and a group's first atom goes last of
    all: no group empties while the others still have atoms to give. The score is that time (later: kept longer)."""
    groups = deps.prunable_groups
    if not groups:
        return {}
    mean = sum(max(saving[g.id], 0.0) for g in groups) / len(groups)
    out = {}
    for g in groups:
        rate = min(RATE_CAP, max(1 / RATE_CAP, saving[g.id] / mean)) if mean > 0 else 1.0
        kept_share = torch.arange(g.width, dtype=torch.float64).clamp(min=0.5) / g.width
        out[g.id] = -torch.log(kept_share) / rate
    return out


class GflopsAware:
    """No ranking of channels: groups shrink at a rate proportional to the MACs that removing one of their atoms
    saves (``FlopModel.saved_per_atom``, averaged over the group), with ``shrink_order``'s cap per group, so
    the costly groups give the most and none collapses. Scores compare across groups: ranked globally."""

    name = "gflops_aware"
    comparable_across_groups = True

    def scores(self, deps: DependencyGraph, gm: torch.fx.GraphModule) -> Scores:
        saved = FlopModel(deps, total_macs(gm)).saved_per_atom()
        return shrink_order(deps, {g.id: float(saved[g.atoms].mean()) for g in deps.prunable_groups})


def _latency_model(deps: DependencyGraph, gm: torch.fx.GraphModule, flops: FlopModel, rule: WidthRule | None) -> LatencyModel:
    """The latency model of ``gm``'s own layers (timed once per device, cached), without the fixed part,
    on widths that ``rule`` allows: off its multiple a layer can run far slower (a depthwise conv of 54
    channels took 1.8x the time of 56 here), and no plan keeps such a width."""
    inputs = tuple(torch.randn(n.meta[keys.TENSOR_META].shape, dtype=n.meta[keys.TENSOR_META].dtype)
                   for n in gm.graph.nodes if n.op == "placeholder")
    return LatencyModel(deps, flops, gm, None, Setting.of(gm, inputs), TimingCache(), rule.round_to if rule else 1)


class LatencyAware:
    """No ranking of channels: like ``gflops_aware``, with the milliseconds that the latency model
    (``latency.LatencyModel``, timings of the model's own layers on this device, cached) says a group
    saves per atom when it loses its first quarter: the groups whose channels cost the most time shrink
    first, none collapses."""

    name = "latency_aware"
    comparable_across_groups = True
    uses_width_rule = True

    def scores(self, deps: DependencyGraph, gm: torch.fx.GraphModule, rule: WidthRule | None = None) -> Scores:
        model = _latency_model(deps, gm, FlopModel(deps, total_macs(gm)), rule)
        none = torch.zeros(deps.num_atoms, dtype=torch.bool)
        full, saving = model.cost(none), {}
        for g in deps.prunable_groups:
            n = max(1, g.width // 4)
            quarter = none.clone()
            quarter[g.atoms[g.width - n:]] = True
            saving[g.id] = (full - model.cost(quarter)) / n
        return shrink_order(deps, saving)


class LatencyPerFlop:
    """No ranking of channels: the fastest model at a FLOPs budget, by the latency model's estimate.

    Channels go in steps of an eighth of a group, last positions first. Each step is the one, among all
    groups, that saves the most estimated milliseconds per MAC it removes (greedy), until every group is
    down to a quarter of its width; the rest of every group then follows in uniform order. The thin,
    memory-bound layers (depthwise convs, narrow convs at high resolution) run far below the dense ones'
    rate, so they give up the most channels. At a FLOPs target this is the fastest allocation the
    estimate finds at those FLOPs; at a latency target, the one that keeps the most MACs for the time.
    Removing a step changes only the cost of the FLOP terms its atoms are in, so after each step only the
    groups that share such a term with it are estimated again."""

    name = "latency_per_flop"
    comparable_across_groups = True
    uses_width_rule = True
    STEPS = 8
    FLOOR = 0.25

    def scores(self, deps: DependencyGraph, gm: torch.fx.GraphModule, rule: WidthRule | None = None) -> Scores:
        flops = FlopModel(deps, total_macs(gm))
        model = _latency_model(deps, gm, flops, rule)
        groups = deps.prunable_groups
        order = {g.id: torch.arange(g.width - 1, -1, -1) for g in groups}
        size = {g.id: max(1, g.width // self.STEPS) for g in groups}
        floor = {g.id: max(1, math.ceil(self.FLOOR * g.width)) for g in groups}

        def worth(atoms: torch.Tensor, after: torch.Tensor, now: tuple[float, float]) -> tuple[float, tuple[float, float]]:
            cost = (model.cost(after), flops.cost(after))
            macs = now[1] - cost[1]
            return ((now[0] - cost[0]) / macs if macs > 0 else 0.0), cost

        none = torch.zeros(deps.num_atoms, dtype=torch.bool)
        return greedy_scores(deps, flops, order, size, floor, worth, (model.cost(none), flops.cost(none)))


Worth = Callable[[torch.Tensor, torch.Tensor, Any], tuple[float, Any]]


def greedy_scores(deps: DependencyGraph, flops: FlopModel, order: dict[int, torch.Tensor], size: dict[int, int],
                  floor: dict[int, int], worth: Worth, start: Any) -> Scores:
    """Scores, comparable across groups, of a greedy removal order.

    Each round removes the next ``size[gid]`` atoms of one group, in its ``order`` (positions, first to go
    first), never below ``floor[gid]`` kept: the group whose step is worth most. ``worth(atoms, after, now)``
    values removing ``atoms`` (the mask becomes ``after``) when the current cost is ``now`` (``start`` at
    first) and returns that value (<= 0: not now) with the cost of ``after``. A step changes only the cost
    of the FLOP terms its atoms are in, so after each round only the groups that share such a term with it
    are valued again. Atoms go in the order of the rounds; what no round removed follows, every group in
    its order at the same pace."""
    groups = {g.id: g for g in deps.prunable_groups}
    gone = dict.fromkeys(groups, 0)
    removed, now = torch.zeros(deps.num_atoms, dtype=torch.bool), start

    def step(gid: int) -> tuple[float, torch.Tensor, Any]:
        """(value, atoms, cost after) of ``gid``'s next step; value 0 when it has none."""
        n = min(size[gid], groups[gid].width - gone[gid] - floor[gid])
        if n <= 0:
            return 0.0, torch.empty(0, dtype=torch.long), now
        atoms = groups[gid].atoms[order[gid][gone[gid] : gone[gid] + n]]
        after = removed.clone()
        after[atoms] = True
        worth_it, cost = worth(atoms, after, now)
        return worth_it, atoms, cost

    neighbours = _sharing_terms(deps, flops)
    value = {gid: step(gid)[0] for gid in groups}
    heap = [(-v, gid) for gid, v in value.items() if v > 0]
    heapq.heapify(heap)
    out = {gid: torch.zeros(g.width, dtype=torch.float64) for gid, g in groups.items()}
    rounds = 0
    while heap:
        v, gid = heapq.heappop(heap)
        if -v != value[gid]:  # valued before a neighbour's step
            continue
        _, atoms, now = step(gid)  # the value holds, but the cost must include every step since
        n = atoms.numel()
        out[gid][order[gid][gone[gid] : gone[gid] + n]] = rounds + 0.5 * torch.arange(1, n + 1, dtype=torch.float64) / n
        removed[atoms] = True
        gone[gid] += n
        rounds += 1
        for other in neighbours[gid]:
            value[other] = step(other)[0]
            if value[other] > 0:
                heapq.heappush(heap, (-value[other], other))
    for gid, g in groups.items():
        rest = order[gid][gone[gid] :]
        out[gid][rest] = rounds + 1 + torch.arange(gone[gid] + 1, g.width + 1, dtype=torch.float64) / g.width
    return out


def _sharing_terms(deps: DependencyGraph, flops: FlopModel) -> dict[int, set[int]]:
    """For each prunable group, the prunable groups that appear in a FLOP term with it (itself included)."""
    in_term: dict[int, set[int]] = {}
    owners = deps.atom_group[flops.cols].tolist()
    for term, group in zip(flops.term_of[flops.rows].tolist(), owners):
        in_term.setdefault(term, set()).add(group)
    out: dict[int, set[int]] = {g.id: {g.id} for g in deps.prunable_groups}
    for members in in_term.values():
        for gid in members & out.keys():
            out[gid] |= members & out.keys()
    return out
