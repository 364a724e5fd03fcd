"""Selectors: which atoms of each group matter most.

A selector has one job: score every atom of every prunable group (higher = keep). How many atoms each
group loses is decided once, by the budget logic in ``passes/select.py``, never by a selector. Any object
with a ``scores(graph, gm)`` method of the same signature can be passed as ``selector=``; one whose scores
are comparable across groups as they are (not only within a group) sets ``comparable_across_groups =
True``, and is then ranked globally without normalization. One that sets ``uses_width_rule = True`` is
called as ``scores(graph, gm, rule=...)`` with the ``WidthRule`` the plan's widths will follow.

``gm`` is the captured GraphModule: it shares its tensors with the user's model, so a selector must not
modify them. Data-driven selectors (``apoz``, ``mean_activation``, ``taylor``) run on calibration data
through ``fxprune.stats``, which never touches them.
"""

from __future__ import annotations

import heapq
import math
from typing import Any, Protocol, runtime_checkable

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from . import metakeys as keys
from .errors import ArgumentError
from .flops import FlopModel, total_macs
from .graph import DependencyGraph, Member
from .latency import LatencyModel
from .optable import canonical
from .passes.select import WidthRule
from . import normgrad
from .stats import CALIBRATION_FORMS, LossFn, Tapped, activation_scores, tap
from .timing import Setting, TimingCache

__all__ = [
    "Selector", "Uniform", "Random", "LpNorm", "L1", "L2", "BNScale", "BNTaylor", "GflopsAware", "LatencyAware", "LatencyPerFlop", "ActivationSelector",
    "APoZ", "MeanActivation", "Taylor", "get_selector", "SELECTORS", "data_driven", "takes_loss",
]

Scores = dict[int, torch.Tensor]


@runtime_checkable
class Selector(Protocol):
    def scores(self, graph: DependencyGraph, gm: torch.fx.GraphModule) -> Scores:
        """Map each prunable group id to one score per atom (length ``group.width``)."""
        ...


class Uniform:
    """No ranking: every group keeps its first atoms, in channel order."""

    name = "uniform"

    def scores(self, graph: DependencyGraph, gm: torch.fx.GraphModule) -> Scores:
        return {g.id: -torch.arange(g.width, dtype=torch.float64) for g in graph.prunable_groups}


class Random:
    """Uniform random scores from torch's global generator, which ``compile`` seeds with ``seed=``."""

    name = "random"

    def scores(self, graph: DependencyGraph, gm: torch.fx.GraphModule) -> Scores:
        return {g.id: torch.rand(g.width, dtype=torch.float64) for g in graph.prunable_groups}


def _state(gm: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    return {**dict(gm.named_parameters()), **dict(gm.named_buffers())}


def _lp_sums(graph: DependencyGraph, state: dict[str, torch.Tensor], members: list[Member], p: float) -> torch.Tensor:
    """Per atom (all atoms of ``graph``): the sum of ``|w|^p`` over the slices of ``members`` it owns."""
    total = torch.zeros(graph.num_atoms, dtype=torch.float64)
    for m in members:
        t = state[m.name].detach().to(torch.float64).abs() ** p
        total.index_add_(0, graph.member_atoms[(m.name, m.dim)], t.movedim(m.dim, 0).reshape(t.shape[m.dim], -1).sum(1))
    return total


class LpNorm:
    """Lp norm of the weights that produce each atom (output slices of conv/linear weights, all of them
    taken as one vector). Groups with no producing weight (a parameter used element-wise) fall back to
    all their members."""

    def __init__(self, p: float) -> None:
        if not p > 0:
            raise ArgumentError(f"LpNorm needs p > 0, got {p}")
        self.p = p
        self.name = f"l{p:g}"

    def scores(self, graph: DependencyGraph, gm: torch.fx.GraphModule) -> Scores:
        state, out = _state(gm), {}
        for g in graph.prunable_groups:
            members = [m for m in g.members if m.role == "out"] or list(g.members)
            out[g.id] = _lp_sums(graph, state, members, self.p)[g.atoms] ** (1 / self.p)
        return out


class L1(LpNorm):
    """L1 norm of the weights that produce each atom."""

    def __init__(self) -> None:
        super().__init__(1)


class L2(LpNorm):
    """L2 norm of the weights that produce each atom."""

    def __init__(self) -> None:
        super().__init__(2)


_NORM_MODULES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
_NORM_FUNCS = {F.batch_norm, F.instance_norm, F.group_norm, F.layer_norm}


def _norm_weights(gm: torch.fx.GraphModule) -> set[str]:
    """Qualified names of the affine weights (gamma) of the normalization layers ``gm`` calls."""
    modules = dict(gm.named_modules())
    found = set()
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], _NORM_MODULES):
            if getattr(modules[node.target], "weight", None) is not None:
                found.add(f"{node.target}.weight")
        elif node.op == "call_function" and canonical(node.target) in _NORM_FUNCS:
            args = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
            weight = args.kwargs.get("weight") if args is not None else None
            if isinstance(weight, torch.fx.Node) and weight.op == "get_attr":
                found.add(weight.target)
    return found


class BNScale:
    """|gamma| of the normalization layers (BatchNorm, InstanceNorm, GroupNorm, LayerNorm) that scale each
    atom, summed when several do; groups without a norm weight fall back to l1."""

    name = "bn_scale"

    def scores(self, graph: DependencyGraph, gm: torch.fx.GraphModule) -> Scores:
        weights = _norm_weights(gm)
        state, fallback, out = _state(gm), L1().scores(graph, gm), {}
        for g in graph.prunable_groups:
            gammas = [m for m in g.members if m.role == "param" and m.name in weights]
            out[g.id] = _lp_sums(graph, state, gammas, 1)[g.atoms] if gammas else fallback[g.id]
        return out


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


class BNTaylor:
    """Taylor estimate on the normalization scales: ``|gamma * dL/dgamma|`` of the norm layers that scale
    each atom (``fxprune.normgrad``). ``compile`` takes it from one pass over ``calibration=`` with
    ``loss_fn=``; ``prune_iteratively(coarse=True)`` reads it from the gradients of the user's own
    fine-tuning and needs neither (its first step ranks by ``|gamma|``, as bn_scale). Atoms no norm layer
    scales score 0."""

    name = "bn_taylor"
    takes_loss = True
    takes_data = True

    def __init__(self, calibration: Any = None, loss_fn: LossFn | None = None) -> None:
        if (calibration is None) != (loss_fn is None):
            raise ArgumentError("selector 'bn_taylor' takes both calibration= and loss_fn= (a pass over that data), or "
                                "neither (prune_iteratively(coarse=True) reads the gradients of your fine-tuning)")
        self.calibration, self.loss_fn = calibration, loss_fn

    def scores(self, graph: DependencyGraph, gm: torch.fx.GraphModule) -> Scores:
        if self.calibration is None:
            raise ArgumentError("selector 'bn_taylor' needs calibration= and loss_fn= here (a pass over that data); "
                                "prune_iteratively(coarse=True) needs neither")
        per_atom = normgrad.atom_sums(graph, normgrad.pass_sums(gm, sorted(_norm_weights(gm)), self.calibration, self.loss_fn))
        return {g.id: per_atom[g.atoms] for g in graph.prunable_groups}

    def untapped_scores(self, graph: DependencyGraph, gm: torch.fx.GraphModule) -> Scores:
        """Scores before any fine-tuning was tapped: the pass when there is data, else |gamma|."""
        return self.scores(graph, gm) if self.calibration is not None else BNScale().scores(graph, gm)

    def tap(self, graph: DependencyGraph, gm: torch.fx.GraphModule) -> normgrad.GradTap:
        return normgrad.GradTap(graph, gm, sorted(_norm_weights(gm)))


class ActivationSelector:
    """Base of the data-driven selectors: scores atoms by a statistic of the activations on calibration
    data (see ``fxprune.stats``). Subclasses define ``values`` and ``finish`` (``ChannelStatistic``)."""

    name = ""
    needs_grad = False
    takes_data = True

    def __init__(self, calibration: Any = None, loss_fn: LossFn | None = None) -> None:
        if calibration is None:
            raise ArgumentError(f"selector {self.name!r} ranks channels by their activations: pass calibration= data, {CALIBRATION_FORMS}")
        if self.needs_grad and loss_fn is None:
            raise ArgumentError(f"selector {self.name!r} needs gradients: pass loss_fn=, called as loss_fn(output, target) on each calibration batch")
        if loss_fn is not None and not self.needs_grad:
            raise ArgumentError(f"loss_fn= is only used by selector 'taylor'; selector {self.name!r} does not take it")
        self.calibration, self.loss_fn = calibration, loss_fn

    def scores(self, graph: DependencyGraph, gm: torch.fx.GraphModule) -> Scores:
        per_atom = activation_scores(graph, gm, self.calibration, self, self.loss_fn)
        return {g.id: per_atom[g.atoms] for g in graph.prunable_groups}

    untapped_scores = scores

    def tap(self, graph: DependencyGraph, gm: torch.fx.GraphModule) -> Tapped:
        """``gm`` with taps that gather this statistic during the user's training forwards (``stats.tap``)."""
        return tap(graph, gm, self)


class APoZ(ActivationSelector):
    """Average percentage of zeros: the share of a channel's activations that are <= 0 (a ReLU's zeros;
    for other nodes, what a ReLU would zero). Score ``1 - APoZ``: the channels that are zero most often go first."""

    name = "apoz"

    def values(self, activation: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
        return (activation <= 0).to(activation.dtype)

    def finish(self, mean: torch.Tensor) -> torch.Tensor:
        return 1 - mean


class MeanActivation(ActivationSelector):
    """Mean |activation| of each channel: the weakest channels go first."""

    name = "mean_activation"

    def values(self, activation: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
        return activation.abs()

    def finish(self, mean: torch.Tensor) -> torch.Tensor:
        return mean


class Taylor(ActivationSelector):
    """First-order Taylor estimate of the loss change when a channel is zeroed: ``|mean(a * dL/da)|`` over
    the batch and every position; the channels whose removal changes the loss least go first."""

    name = "taylor"
    needs_grad = True
    takes_loss = True

    def values(self, activation: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
        return activation * grad

    def finish(self, mean: torch.Tensor) -> torch.Tensor:
        return mean.abs()


SELECTORS: dict[str, type] = {
    "uniform": Uniform, "random": Random, "l1": L1, "l2": L2, "bn_scale": BNScale, "gflops_aware": GflopsAware,
    "latency_aware": LatencyAware, "latency_per_flop": LatencyPerFlop,
    "apoz": APoZ, "mean_activation": MeanActivation, "taylor": Taylor, "bn_taylor": BNTaylor,
}


def get_selector(selector: str | Selector, calibration: Any = None, loss_fn: LossFn | None = None) -> Selector:
    """The selector named ``selector`` (data-driven ones get ``calibration``/``loss_fn``), or the object itself."""
    if isinstance(selector, str):
        if selector not in SELECTORS:
            raise ArgumentError(f"unknown selector {selector!r}; choose one of {sorted(SELECTORS)} or pass an object with a scores(graph, gm) method")
        cls = SELECTORS[selector]
        if getattr(cls, "takes_data", False):
            return cls(calibration, loss_fn)
        selector = cls()
    elif not isinstance(selector, Selector):
        raise ArgumentError(f"selector {selector!r} has no scores(graph, gm) method")
    if calibration is not None or loss_fn is not None:
        given = "calibration=" if calibration is not None else "loss_fn="
        raise ArgumentError(
            f"{given} is only used by the data-driven selectors {', '.join(map(repr, data_driven()))}; "
            f"selector {selector_name(selector)!r} does not read it (a selector object takes its data itself)"
        )
    return selector


def data_driven() -> list[str]:
    """Names of the selectors that read calibration data."""
    return [name for name, cls in SELECTORS.items() if getattr(cls, "takes_data", False)]


def takes_loss(name: str) -> bool:
    """Whether the selector ``name`` takes ``loss_fn=`` (ranks by gradients of a loss)."""
    return bool(getattr(SELECTORS.get(name), "takes_loss", False))


def selector_name(selector: Any) -> str:
    """A selector's ``name``, or its class name for a user's object without one."""
    return getattr(selector, "name", type(selector).__name__)
