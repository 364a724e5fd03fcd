"""multiples: a FLOPs target reached with the width rule, and ``round_to="auto"`` made a number.

A FLOPs budget is met exactly by the selection pass; what is left to decide here is the channel multiple.
``round_to="auto"`` reads no clock under a FLOPs target (the same plan on any machine, at any load) and is
measured under a latency target; when its multiple leaves a target out of reach, finer ones are tried.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from ..core.groups import Plan
from ..core.masks import removed_mask
from ..errors import TargetUnreachableError
from ..latency.multiple import fast_multiple, steady_multiple
from ..latency.cache import TimingCache
from ..latency.timing import Setting
from ..pipeline import Analysis, select_plan
from ..selection.strategy import Chooser

__all__ = ["measure_round_to", "finer", "close", "multiple_reaching", "within", "fallback_note", "CLOSE"]

log = logging.getLogger("fxprune")


def measure_round_to(a: Analysis, chooser: Chooser, timed: bool, cache: TimingCache | None = None, total_ms: float | None = None) -> Chooser:
    """``chooser`` with ``round_to="auto"`` made a number: for a latency target (``timed``) the multiple
    measured fastest on ``a`` (``latency.multiple.fast_multiple``; its timings go to ``cache``, the checked
    machine's, and ``total_ms``, the original's time there, sizes their estimate), for a FLOPs target the one
    decided without the clock (``latency.multiple.steady_multiple``), so that a FLOPs target gives the same
    plan at any moment."""
    if chooser.strategy.round_to != "auto":
        return chooser
    if timed:
        multiple = fast_multiple(a.gm, a.deps, Setting.of(a.gm, a.inputs), cache or TimingCache(), total_ms)
        log.info("round_to='auto': widths are multiples of %d, measured fastest on this device", multiple)
    else:
        multiple = steady_multiple(a.gm, a.deps, a.modules)
    return replace(chooser, strategy=replace(chooser.strategy, round_to=multiple), measured=True)


def finer(chooser: Chooser) -> list[Chooser]:
    """``chooser`` and, when its multiple was measured (``round_to="auto"``), the same with every finer
    multiple down to 1: what "auto" falls back to when its multiple leaves a target out of reach, so
    that it never reaches less than ``round_to=1`` would."""
    if not chooser.measured:
        return [chooser]
    out, r = [chooser], chooser.strategy.round_to
    while r > 1:
        r //= 2
        out.append(replace(chooser, strategy=replace(chooser.strategy, round_to=r)))
    return out


CLOSE = 0.03
"""Under ``round_to="auto"``, a FLOPs target whose plan lands further than this below its budget falls
back to a finer multiple (at ``round_to=1`` plans land within it)."""


def close(a: Analysis, plan: Plan, macs: float) -> bool:
    """Whether ``plan`` keeps at least ``1 - CLOSE`` of the ``macs`` budget."""
    return a.flops.macs(removed_mask(a.deps, plan)) >= (1 - CLOSE) * macs


def multiple_reaching(a: Analysis, chooser: Chooser, macs: float) -> Chooser:
    """The first of ``finer(chooser)`` whose width rule gets the model down to ``macs``, within ``CLOSE``
    (the last if none does); the width rule, not the scores, decides that, so flat scores are used."""
    options = finer(chooser)
    flat = {g.id: torch.zeros(g.width) for g in a.deps.prunable_groups}
    for used in options[:-1]:
        try:
            if close(a, select_plan(a, used, macs, flat), macs):
                return used
        except TargetUnreachableError:
            continue
    return options[-1]


def within(a: Analysis, chooser: Chooser, macs: float, seed: int) -> tuple[Chooser, Plan]:
    """The plan of a FLOPs budget of ``macs`` and the chooser that made it: ``chooser``'s own multiple when
    its plan keeps within ``CLOSE`` of the budget, else the first of ``finer(chooser)`` that does (the last
    if none). The scores are computed once, unless the selector reads the width rule."""
    def scored(used: Chooser, scores: dict[int, torch.Tensor] | None) -> dict[int, torch.Tensor]:
        if scores is not None and not getattr(used.selector, "uses_width_rule", False):
            return scores
        return used.scores(a.deps, a.gm, seed, cost=a.flops)

    *options, last = finer(chooser)
    scores = None
    for used in options:
        scores = scored(used, scores)
        try:
            plan = select_plan(a, used, macs, scores)
        except TargetUnreachableError:
            continue
        if close(a, plan, macs):
            return used, plan
    return last, select_plan(a, last, macs, scored(last, scores))


def fallback_note(tried: Chooser, used: Chooser, target: str) -> str | None:
    """The report's note when "auto" fell back from ``tried``'s multiple to ``used``'s."""
    if tried is used:
        return None
    note = (f"round_to='auto': multiples of {tried.strategy.round_to} (its multiple for this model and target) do not reach {target} "
            f"(a FLOPs target: within {CLOSE:.0%}); widths are multiples of {used.strategy.round_to} instead")
    log.warning(note)
    return note
