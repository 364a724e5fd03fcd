"""Selectors that rank by cost instead of importance: ``gflops_aware`` and ``latency_aware`` shrink groups
at a rate proportional to what one of their channels costs (MACs or measured milliseconds), and
``latency_per_flop`` removes channels where they save the most milliseconds per FLOP."""

from __future__ import annotations

import heapq
import math

import torch
import torch.fx

from ..core import metakeys as keys
from ..core.flops import FlopModel, total_macs
from ..core.graph import DependencyGraph
from ..core.widths import WidthRule
from ..latency.costmodel import LatencyModel
from ..latency.timing import Setting, TimingCache
from .protocol import Scores

__all__ = ["GflopsAware", "LatencyAware", "LatencyPerFlop", "shrink_order", "RATE_CAP"]


RATE_CAP = 2.0
"""How much faster than the average group the costliest group may shrink (and the cheapest slower)."""


def shrink_order(graph: DependencyGraph, saving: dict[int, float]) -> Scores:
    """Ranking-free scores, comparable across groups, from each group's saving per removed atom.

    Every group shrinks as if it decayed at a rate proportional to its saving per atom (relative to the
    mean over groups, capped at ``RATE_CAP`` times faster or slower): its ``k``-th atom (from the last
    position) goes at time ``-ln(1 - k / width) / rate``. So the groups that save the most per atom shrink
    first and fastest, every group shrinks more slowly as it thins, and a group's first atom goes last of
    all: no group empties while the others still have atoms to give. The score is that time (later: kept longer)."""
    groups = graph.prunable_groups
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

    def scores(self, graph: DependencyGraph, gm: torch.fx.GraphModule) -> Scores:
        saved = FlopModel(graph, total_macs(gm)).saved_per_atom()
        return shrink_order(graph, {g.id: float(saved[g.atoms].mean()) for g in graph.prunable_groups})


def _latency_model(graph: DependencyGraph, gm: torch.fx.GraphModule, flops: FlopModel, rule: WidthRule | None) -> LatencyModel:
    """The latency model of ``gm``'s own layers (timed once per device, cached), without the fixed part,
    on widths that ``rule`` allows: off its multiple a layer can run far slower (a depthwise conv of 54
    channels took 1.8x the time of 56 here), and no plan keeps such a width."""
    inputs = tuple(torch.randn(n.meta[keys.TENSOR_META].shape, dtype=n.meta[keys.TENSOR_META].dtype)
                   for n in gm.graph.nodes if n.op == "placeholder")
    return LatencyModel(graph, flops, gm, None, Setting.of(gm, inputs), TimingCache(), rule.round_to if rule else 1)


class LatencyAware:
    """No ranking of channels: like ``gflops_aware``, with the milliseconds that the latency model
    (``latency.LatencyModel``, timings of the model's own layers on this device, cached) says a group
    saves per atom when it loses its first quarter: the groups whose channels cost the most time shrink
    first, none collapses."""

    name = "latency_aware"
    comparable_across_groups = True
    uses_width_rule = True

    def scores(self, graph: DependencyGraph, gm: torch.fx.GraphModule, rule: WidthRule | None = None) -> Scores:
        model = _latency_model(graph, gm, FlopModel(graph, total_macs(gm)), rule)
        none = torch.zeros(graph.num_atoms, dtype=torch.bool)
        full, saving = model.cost(none), {}
        for g in graph.prunable_groups:
            n = max(1, g.width // 4)
            quarter = none.clone()
            quarter[g.atoms[g.width - n:]] = True
            saving[g.id] = (full - model.cost(quarter)) / n
        return shrink_order(graph, saving)


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

    def scores(self, graph: DependencyGraph, gm: torch.fx.GraphModule, rule: WidthRule | None = None) -> Scores:
        flops = FlopModel(graph, total_macs(gm))
        model = _latency_model(graph, gm, flops, rule)
        groups = {g.id: g for g in graph.prunable_groups}
        kept = {gid: g.width for gid, g in groups.items()}
        floor = {gid: max(1, math.ceil(self.FLOOR * g.width)) for gid, g in groups.items()}
        removed = torch.zeros(graph.num_atoms, dtype=torch.bool)
        now = (model.cost(removed), flops.cost(removed))

        def step(gid: int) -> tuple[float, torch.Tensor, tuple[float, float]]:
            """(ms saved per MAC, the mask after, its cost) of ``gid``'s next step; 0 when it has none."""
            n = min(max(1, groups[gid].width // self.STEPS), kept[gid] - floor[gid])
            after = removed.clone()
            if n <= 0:
                return 0.0, after, now
            after[groups[gid].atoms[kept[gid] - n : kept[gid]]] = True
            cost = (model.cost(after), flops.cost(after))
            macs = now[1] - cost[1]
            return ((now[0] - cost[0]) / macs if macs > 0 else 0.0), after, cost

        neighbours = _sharing_terms(graph, flops)
        value = {gid: step(gid)[0] for gid in groups}
        heap = [(-v, gid) for gid, v in value.items() if v > 0]
        heapq.heapify(heap)
        out = {gid: torch.zeros(g.width, dtype=torch.float64) for gid, g in groups.items()}
        rounds = 0
        while heap:
            v, gid = heapq.heappop(heap)
            if -v != value[gid]:  # estimated before a neighbour's step
                continue
            _, after, now = step(gid)  # the value holds, but the mask and cost must include every step since
            n = int((after & ~removed).sum())
            out[gid][kept[gid] - n : kept[gid]] = rounds + 0.5 * torch.arange(n, 0, -1, dtype=torch.float64) / n
            kept[gid] -= n
            removed, rounds = after, rounds + 1
            for other in neighbours[gid]:
                value[other] = step(other)[0]
                if value[other] > 0:
                    heapq.heappush(heap, (-value[other], other))
        for gid, g in groups.items():
            out[gid][: kept[gid]] = rounds + 1 + (1 - torch.arange(kept[gid], dtype=torch.float64) / g.width)
        return out


def _sharing_terms(graph: DependencyGraph, flops: FlopModel) -> dict[int, set[int]]:
    """For each prunable group, the prunable groups that appear in a FLOP term with it (itself included)."""
    in_term: dict[int, set[int]] = {}
    owners = graph.atom_group[flops.cols].tolist()
    for term, group in zip(flops.term_of[flops.rows].tolist(), owners):
        in_term.setdefault(term, set()).add(group)
    out: dict[int, set[int]] = {g.id: {g.id} for g in graph.prunable_groups}
    for members in in_term.values():
        for gid in members & out.keys():
            out[gid] |= members & out.keys()
    return out
