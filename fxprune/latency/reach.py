"""reach: a latency target (``speedup=``, ``target_latency_ms=``) met as measured, never claimed on noise.

Both targets are a goal for the ratio of the result's time to the original's, timed in turns
(``timing.compare``): 1 / speedup, or the target's milliseconds over the original's. The original is first
timed against itself (an A/A pair), which gives its milliseconds and the machine's noise. The latency
model turns the goal into an estimated-milliseconds budget; each round selects a plan, rewrites it and
compares the result with the original, taking more rounds while the ratio's interval holds the goal.

A result meets the goal when its whole interval does. A measured ratio far from the latency model's
estimate (outside ``BAND``) is timed again before it is believed; a plan that removes nothing is never
timed (its ratio is 1). Until one result meets the aim (``MARGIN`` below the goal) and one misses it, the
next budget is the last estimate scaled by aim / measured (at most 2x either way); then it moves between
the closest pair by linear interpolation (measured latency is not monotone in the widths). It stops at a
result that meets the goal within 6% of the aim. The slowest result that meets the goal wins; when it
is more than ``OVERSHOOT`` times faster than asked while wider results were left undecided by the noise,
those are timed again with more rounds, and a machine too noisy to decide them raises
``MeasurementError`` rather than return a model pruned far past its target. If none
does, ``MeasurementError`` says when the noise kept the best one from being decided (or, with
``on_noise="warn"``, that one is returned with a warning and its interval), else
``TargetUnreachableError`` names the best speed-up measured.

Comparisons are cached (``TimingCache``) under the captured architecture and the result's widths, only
when stable; a result chosen from cached comparisons is timed once more, briefly, against the original
before it is returned, and that timing is the one reported; a cache that no longer holds (the new
timing misses the goal) is dropped and the search runs afresh.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn

from . import costmodel
from ..core.dataflow import layers
from ..errors import MeasurementError, TargetUnreachableError
from ..core.graph import Plan
from ..core.masks import removed_mask
from ..passes.rewrite import rewrite
from ..pipeline import Analysis, Target, select_plan
from ..selection.strategy import Chooser
from .timing import CONFIDENCE, Comparison, Setting, TimingCache, compare

__all__ = ["reach", "ROUNDS", "MARGIN", "BAND", "OVERSHOOT"]

log = logging.getLogger("fxprune")

ROUNDS = 8
"""How many pruned models a latency target measures at most."""

MARGIN = 0.06
"""A latency target aims this much below its goal, so that the goal holds when the user measures again."""

BAND = 1.5
"""A measured speed-up more than this factor away from the latency model's estimate is timed again. On
quiet runs the two agreed within 1.47x (8 targets, median 1.10); under load they were 1.68x apart
(docs/latency.md, "Estimated against measured")."""

OVERSHOOT = 1.3
"""A result more than this many times faster than asked for gets a note saying why (the widths' steps)."""


@dataclass(frozen=True)
class Trial:
    """One candidate: its plan, its comparison with the original, the latency model's estimated ratio,
    and whether the comparison was read from the cache."""

    plan: Plan
    comparison: Comparison
    estimate: float
    cached: bool

    @property
    def ratio(self) -> float:
        return self.comparison.ratio


class Clock:
    """Comparisons of pruned candidates with the original, kept in the ``TimingCache`` under the captured
    architecture and the candidate's widths when they are stable."""

    def __init__(self, a: Analysis, setting: Setting, cache: TimingCache) -> None:
        self.a, self.setting, self.cache = a, setting, cache
        parts = [a.gm.code, *(f"{n}{list(t.shape)}" for n, t in (*a.gm.named_parameters(), *a.gm.named_buffers())),
                 *(f"{list(t.shape)} {t.dtype}" for t in a.inputs if isinstance(t, torch.Tensor))]
        self.prefix = f"model {hashlib.sha1(chr(10).join(parts).encode()).hexdigest()} "
        self.rounds = 15
        self.timed = 0
        self.pruned: dict[str, tuple[torch.fx.GraphModule, nn.Module]] = {}  # widths -> (rewritten graph, result)

    def _compare(self, key: str, candidate: Any, goal: float | None, rounds: int) -> tuple[Comparison, bool]:
        def measure() -> list[Any]:
            self.timed += 1
            return compare(self.a.model, candidate(), self.a.inputs, rounds=rounds, goal=goal).to_row()

        timed = self.timed
        row = self.cache.get(self.setting, self.prefix + key, measure, lambda r: Comparison.from_row(r, self.setting).stable)
        self.cache.save()
        return Comparison.from_row(row, self.setting), self.timed == timed

    def baseline(self) -> Comparison:
        """The original against itself: its milliseconds and the machine's noise."""
        c, _ = self._compare("original", lambda: self.a.model, None, 15)
        self.rounds = max(9, min(31, int(3000 / (3 * c.before.median_ms))))
        return c

    def result(self, plan: Plan) -> tuple[torch.fx.GraphModule, nn.Module]:
        widths = _widths(plan)
        if widths not in self.pruned:
            pruned = rewrite(self.a.gm, self.a.graph, plan)
            self.pruned[widths] = pruned, self.a.result(pruned)
        return self.pruned[widths]

    def compare(self, plan: Plan, goal: float, turn: int = 1) -> tuple[Comparison, bool]:
        """``plan``'s result against the original (``turn``: the how-manieth timing of this pair); whether it was cached."""
        return self._compare(f"widths {_widths(plan)} timing {turn}", lambda: self.result(plan)[1], goal, self.rounds * turn)

    def recheck(self, plan: Plan) -> Comparison:
        """A short timing of ``plan``'s result against the original, never cached."""
        self.timed += 1
        return compare(self.a.model, self.result(plan)[1], self.a.inputs, rounds=max(9, self.rounds // 2), most=0)

    def drop(self) -> None:
        """Forget every cached comparison of this architecture."""
        self.cache.drop(self.setting, self.prefix)
        self.cache.save()


def _widths(plan: Plan) -> str:
    return json.dumps({gid: len(kept) for gid, kept in sorted(plan.keep.items())}, separators=(",", ":"))


def reach(a: Analysis, chooser: Chooser, target: Target, seed: int, fresh: bool = False) -> tuple[Plan, torch.fx.GraphModule, dict[str, Any]]:
    """The plan, rewritten model and measurement record of a latency target (see the module docstring); the
    selector scores with ``seed``, and one that ranks by cost gets the latency model."""
    setting, cache = Setting.of(a.gm, a.inputs), TimingCache()
    clock = Clock(a, setting, cache)
    if fresh:
        clock.drop()
    base = clock.baseline()
    if not base.stable:  # layer timings taken now may sit in a burst; use them, keep none
        log.info("the original against itself varied by %.1f%%: this compile's timings are not cached", 100 * base.noise)
        cache.hold()
    original_ms = base.before.median_ms
    goal = target.latency_ms / original_ms if target.latency_ms is not None else 1 / target.speedup
    aim = goal * (1 - MARGIN)
    model = costmodel.LatencyModel(a.graph, a.flops, a.gm, original_ms, setting, cache, chooser.rule.round_to)
    scores = chooser.scores(a.graph, a.gm, seed, cost=model)
    trials = _search(a, chooser, scores, clock, model, base, goal, aim)
    met = [t for t in trials if t.comparison.meets(goal)]
    if not met:
        chosen = _refuse(target, trials, goal, original_ms, setting, chooser)
    else:
        chosen = _closest(max(met, key=lambda t: t.ratio), trials, goal, target, clock)
    c, cached = chosen.comparison, None
    if chosen.cached:  # a cached claim is checked against the clock before it is returned, and the new timing is what is reported
        c, cached = clock.recheck(chosen.plan), c.speedup
        if c.ratio > goal and not fresh:
            log.warning("the cached timing of this result (%s) did not hold when timed again (%s): timing afresh",
                        chosen.comparison.describe(), c.describe())
            return reach(a, chooser, target, seed, fresh=True)
    record = {"target": {"speedup": target.speedup, "latency_ms": target.latency_ms}, "goal_ms": goal * original_ms,
              "before_ms": c.before.median_ms, "after_ms": c.after.median_ms, "speedup": c.speedup,
              "interval": [1 / c.high, 1 / c.low], "confidence": CONFIDENCE, "noise": max(c.noise, base.noise),
              "comparison_rounds": c.rounds, "estimated_speedup": 1 / chosen.estimate, "cached_speedup": cached,
              "batch": c.before.batch, "device": setting.device, "device_name": setting.device_name, "threads": setting.threads,
              "dtype": setting.dtype, "timings_taken": cache.measured, "rounds": len(trials), "results_timed": clock.timed,
              "notes": _overshoot(chosen, trials, goal)}
    names = {n.name: name for n, (name, _) in layers(a.gm).items()}
    record["layers_ms"] = {names.get(node, node): ms for node, ms in model.layers(removed_mask(a.graph, chosen.plan)).items()}
    return chosen.plan, clock.result(chosen.plan)[0], record


def _search(a: Analysis, chooser: Chooser, scores: dict[int, torch.Tensor], clock: Clock, model: costmodel.LatencyModel,
            base: Comparison, goal: float, aim: float) -> list[Trial]:
    budget, smallest = aim * model.total, False
    trials: list[Trial] = []
    seen: dict[str, Trial] = {}
    for _ in range(ROUNDS):
        try:
            plan = select_plan(a, chooser, budget, scores, model)
        except TargetUnreachableError as exc:
            if smallest:
                break
            budget, smallest = model.total / exc.best_speedup, True
            plan = select_plan(a, chooser, budget, scores, model)
        removed = removed_mask(a.graph, plan)
        estimate = model.cost(removed) / model.total
        widths = _widths(plan)
        if widths in seen:  # the budget moved too little to change the widths
            trial = seen[widths]
        elif not bool(removed.any()):
            trial = Trial(plan, Comparison.identical(base.before), 1.0, False)
        else:
            c, cached = clock.compare(plan, goal)
            if not 1 / BAND <= c.ratio / estimate <= BAND:  # far from the model's estimate: time it again first
                log.info("measured %.3gx against %.3gx estimated: timing it again", c.speedup, 1 / estimate)
                c, cached = clock.compare(plan, goal, turn=2)
            trial = Trial(plan, c, estimate, cached)
        seen[widths] = trial
        trials.append(trial)
        c = trial.comparison
        log.info("round %d: %s, aiming at %.3gx (%.3gx estimated)", len(trials), c.describe(), 1 / aim, 1 / estimate)
        if c.meets(goal) and c.ratio >= 0.94 * aim:
            break
        budget = _next_budget(trials, aim, model.total)
    return trials


def _next_budget(trials: list[Trial], aim: float, total: float) -> float:
    """The next estimated-ms budget: the last estimate corrected by aim / measured (at most 2x either way),
    or, once results lie on both sides of the aim, linear interpolation between the closest pair."""
    fast = [(t.estimate, t.ratio) for t in trials if t.ratio <= aim]
    slow = [(t.estimate, t.ratio) for t in trials if t.ratio > aim]
    if not fast or not slow:
        last = trials[-1]
        return total * last.estimate * min(2.0, max(0.5, aim / last.ratio))
    (e0, m0), (e1, m1) = max(fast), min(slow)
    if e1 <= e0:  # a costlier estimate measured faster: look just above the best fast one
        return total * e0 * 1.02
    w = min(0.9, max(0.1, (aim - m0) / (m1 - m0)))
    return total * (e0 + w * (e1 - e0))


def _refuse(target: Target, trials: list[Trial], goal: float, original_ms: float, setting: Setting, chooser: Chooser) -> Trial:
    """No result met the goal: the noise error when the best one was undecided, else the unreachable one;
    with ``on_noise="warn"``, an undecided best result whose median meets the goal is returned instead."""
    best = min(trials, key=lambda t: t.ratio)
    c = best.comparison
    asked = f"{target.describe()} ({1 / goal:.3g}x faster than the original's {original_ms:.4g} ms)"
    if c.meets(goal) is None:
        message = (f"the machine was too noisy to tell whether a result meets {asked} on {setting.device}: the best one measured "
                   f"{c.describe()}. Close other work on the machine and compile again, ask for a target the noise cannot hide "
                   "(a smaller speed-up), or prune to FLOPs (target_gflops= or ratio=), which needs no timing; "
                   "on_noise='warn' returns that result with a warning.")
        return _too_noisy(message, best, target.on_noise == "warn" and c.ratio <= goal)
    raise TargetUnreachableError(
        f"the latency target {asked} is out of reach on {setting.device}: the best speed-up measured ({len(trials)} results timed) "
        f"was {c.speedup:.3g}x ({c.after.median_ms:.4g} ms, {chooser.rule}; {CONFIDENCE:.0%} interval {1 / c.high:.3g}-"
        f"{1 / c.low:.3g}x). Ask for at most that, lower min_width/round_to, or un-freeze groups (see analyze()).",
        best_speedup=c.speedup,
    )


def _closest(chosen: Trial, trials: list[Trial], goal: float, target: Target, clock: Clock) -> Trial:
    """``chosen``, unless it is more than ``OVERSHOOT`` times faster than asked while wider results whose
    medians meet the goal were left undecided by the noise: those are timed again with three times the
    rounds (the widest first, two at most), and if none can be decided, the machine was too noisy to find a
    result near the target: ``MeasurementError`` (``on_noise="warn"``: ``chosen``, with a warning)."""
    if not _far(chosen, goal):
        return chosen
    near = sorted((t for t in trials if t.ratio > chosen.ratio and t.ratio <= goal and t.comparison.meets(goal) is None),
                  key=lambda t: t.ratio, reverse=True)
    for t in near[:2]:
        c, _ = clock.compare(t.plan, goal, turn=3)
        if c.meets(goal):
            return Trial(t.plan, c, t.estimate, False)
    if not near:
        return chosen
    message = (f"the machine was too noisy to find a result near {target.describe()}: the results that met it measured "
               f"{chosen.comparison.speedup:.3g}x and faster (more than {OVERSHOOT:g} times the target), and the one nearer it, "
               f"{near[0].comparison.describe()}, could not be told from the target. Close other work and compile again, or "
               "prune to FLOPs (target_gflops= or ratio=); on_noise='warn' returns the faster result with a warning.")
    _too_noisy(message, near[0], target.on_noise == "warn")
    return chosen


def _far(trial: Trial, goal: float) -> bool:
    """Whether ``trial`` is more than ``OVERSHOOT`` times faster than the goal asks."""
    return trial.ratio * OVERSHOOT < goal


def _too_noisy(message: str, undecided: Trial, warn: bool) -> Trial:
    """``undecided`` with a warning that says ``message`` when ``warn``, else ``MeasurementError`` with its interval."""
    c = undecided.comparison
    if not warn:
        raise MeasurementError(message, interval=(1 / c.high, 1 / c.low), noise=c.noise)
    warnings.warn(f"fxprune.compile: {message}", stacklevel=5)
    return undecided


def _overshoot(chosen: Trial, trials: list[Trial], goal: float) -> list[str]:
    """A note when the result is more than ``OVERSHOOT`` times faster than asked for: the wider plans tried missed."""
    if not _far(chosen, goal):
        return []
    wider = [t for t in trials if t.estimate > chosen.estimate and not t.comparison.meets(goal)]
    why = (f"the next wider plan tried measured {min(wider, key=lambda t: t.estimate).comparison.speedup:.3g}x, short of the target: "
           "the allowed widths step from one to the other" if wider else "no wider plan was found within the rounds the search takes")
    return [f"the result measured {chosen.comparison.speedup:.3g}x, more than {OVERSHOOT:g} times the {1 / goal:.3g}x asked for: {why}"]
