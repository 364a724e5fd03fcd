"""latency: a latency target (``speedup=``, ``target_latency_ms=``) met as measured, in seconds, never claimed on noise.

Both targets are a goal for the ratio of the result's time to the original's, timed in turns (``timing.compare``): 1 /
speedup, or the target's milliseconds over the original's. First the machine is checked for a few seconds
(``machine.check``, twice when the first look finds it busy): a machine whose noise or stalls could not decide the
target gets ``MeasurementError`` at once, with the figures and what to do. Then the latency model proposes and the clock
confirms: each candidate is the plan the model puts at the current budget, timed against the original until its interval
decides the goal (``FEWEST`` rounds or more; rounds hit by a burst are dropped). A result meets the goal when its whole
interval, widened by the A/A noise, does.

Until one result meets the aim (``MARGIN`` below the goal, lower after results too close to the goal to tell:
``trials.decidable_aim``) and one misses it, the next budget is the last estimate scaled by aim / measured (at most 2x
either way); then it moves between the closest pair by linear interpolation. It stops at a result that meets the goal
with ``trials.SPARE`` to spare and within 6% of the aim, when the closest pair is estimated within ``trials.NEAR``, or at
a step the model does not see (``trials.stepped``). A measured ratio far (outside ``BAND``) from the model's estimate,
and from it scaled by the median measured over estimated ratio of the search's timings so far, is timed again before
it is believed, and so are two timings that contradict the width order (a plan with more channels in every group
measured faster than one with fewer, beyond the noise): if they still do, the machine changed under the search, and
it refuses. The slowest result that meets the goal with that much to spare wins (else the slowest that meets it); when
it is more than ``OVERSHOOT`` times faster than asked, the nearest results that keep more are timed again, and plans between are
tried by bisection (``nearer``); a result that far past the target is returned only when the speed steps from one to the other (the
report says why), never when the noise left nearer ones undecided.

The chosen result is timed once more against the original, never from the cache, until its interval is within
``PRECISE``: that timing is the one reported, unless it and the search's timing of the result disagree (each median
outside the other's interval) or a noisy machine left it undecided: then a third timing is taken, and the report gives
the confirming one nearer the median of the three that the noise did not leave undecided (``MeasurementError`` when it
left both: ``Clock.settled``); when this compile's steady timings caught the original at two speeds (``trials.SPEEDS``),
a note says so. The widths chosen for a model, target and strategy are kept (when that timing's median meets the goal
and, for a result more than ``OVERSHOOT`` past it, only where the speed steps), so a warm compile confirms that result
first (twice when the noise leaves the first timing undecided) and returns it when its whole interval meets the goal;
else it searches from that timing (without the cached comparisons when it misses: the machine runs otherwise than when
they were taken), as a search whose original moved off its checked speed for good does from the candidate timed at the
new speed (with its layers timed again when the original now runs ``DRIFT`` times faster: ``Search.searched``). Comparisons are
cached (``TimingCache``) under the captured architecture and the result's widths, only when
stable; when the confirming timing misses the goal (or meets it by less than ``SPARE``), they are dropped and it
searches afresh from it, once. A result whose confirming timing misses the goal then is not returned as meeting it:
``MeasurementError`` (``on_noise="warn"``: returned with a warning). A search that ends in ``MeasurementError`` takes
the timings it kept off the cache again (``TimingCache.withdraw``): they may sit in the onset of the load that ended
it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import statistics
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx

from ..latency import costmodel
from ..latency.cache import TimingCache
from ..latency.machine import Machine, check, fresh_pages
from ..latency.intervals import CONFIDENCE
from ..latency.timing import STABLE, Comparison, Setting
from ..core.dataflow import layers
from ..core.groups import Plan
from ..core.masks import removed_mask
from ..errors import MeasurementError, TargetUnreachableError
from ..pipeline import Analysis, select_plan
from ..selection.strategy import Chooser
from .nearer import nearer
from .target import Target
from .trials import (LIMITS, OVERSHOOT, SPARE, Clock, Trial, contradict, decidable_aim, far, fingerprint, next_budget,
                     overshoot, raise_or_warn, span, spared, speeds, stepped, too_noisy, undecidable, widths)

__all__ = ["check_machine", "measured", "Checked", "ROUNDS", "MARGIN", "BAND", "OVERSHOOT", "DRIFT"]

log = logging.getLogger("fxprune")

ROUNDS = 8
"""How many pruned models a latency target measures at most."""

MARGIN = 0.06
"""A latency target aims this much below its goal, so that the goal holds when the user measures again (``trials.SPARE``)."""

BAND = 1.5
"""A measured speed-up more than this factor away from the latency model's estimate, and from it as far off as the
search's timings so far (MobileNetV2 at batch 8 ran 1.5-1.7x faster than estimated, each), is timed again."""

DRIFT = 1.3
"""A comparison whose original ran this many times slower or faster than during the machine check was
taken under another load (contention slows the original too, and a ratio taken while other work stalls
our threads is biased towards 1): it is timed again, and a search whose load keeps changing refuses."""

Checked = tuple[Setting, TimingCache, Machine]  # where a target is timed, the cache its timings go to, the machine check


def check_machine(a: Analysis, target: Target) -> Checked:
    """The machine checked before anything of a latency target is timed (module docstring): ``MeasurementError``
    when its noise could not decide ``target``; on a noisy machine that can, a cache that keeps no timing."""
    setting, cache = Setting.of(a.gm, a.inputs), TimingCache()
    if not a.deps.prunable_groups:
        raise TargetUnreachableError(f"the latency target {target.describe()} is out of reach: no channel group of the model can be "
                                     "pruned (see analyze() for why each is frozen), so the best speed-up was 1x", best_speedup=1.0)
    machine = check(a.model, a.inputs)
    if (why := machine.refusal()) is not None:  # a burst may pass: one more look before refusing
        log.info("the machine looked busy (%s): checking again", why.split(" (")[0])
        machine = check(a.model, a.inputs)
    undecidable(machine.refusal(), machine.noise, target, setting.device)
    if (machine := dataclasses.replace(machine, faults=fresh_pages(a.gm, setting.device))).faults:
        log.warning(machine.faults)
    log.info("the original takes %.4g ms at %d threads; its A/A pairs varied by %.1f%%", machine.original.median_ms,
             setting.threads, 100 * machine.noise)
    if machine.noise > STABLE:  # timings taken now may sit in a burst; use them, keep none
        log.info("the machine is noisy: this compile's timings are not cached")
        cache.hold()
    return setting, cache, machine


def measured(a: Analysis, chooser: Chooser, target: Target, seed: int, checked: Checked) -> tuple[Plan, torch.fx.GraphModule, dict[str, Any]]:
    """The plan, rewritten model and measurement record of ``target`` on the ``checked`` machine (module docstring);
    on ``MeasurementError``, the timings the search kept are withdrawn from the cache."""
    try:
        return Search(a, chooser, target, seed, *checked).run()
    except MeasurementError:
        checked[1].withdraw()
        raise


class Search:
    """The search of one latency target (module docstring): candidates proposed by the latency model, timed by the clock."""

    def __init__(self, a: Analysis, chooser: Chooser, target: Target, seed: int, setting: Setting, cache: TimingCache,
                 machine: Machine) -> None:
        self.a, self.chooser, self.target, self.setting, self.cache, self.seed = a, chooser, target, setting, cache, seed
        self.original, self.noise, self.notes = machine.original, machine.noise, [machine.faults] if machine.faults else []
        original_ms = self.original_ms = machine.original.median_ms
        self.goal = target.latency_ms / original_ms if target.latency_ms is not None else 1 / target.speedup
        self.aim = self.goal * (1 - MARGIN)
        self.clock = Clock(a, setting, cache, machine.burst)
        self.timed = 0  # candidates timed, over both passes
        self.budgets: dict[str, float] = {}  # widths -> the first estimated-ms budget that gave them
        self.step: str | None = None  # why the result is far past the target with no nearer plan to try
        self.claimed: float | None = None  # the speed-up an earlier compile reported for the remembered result
        self.searching = self.rechecked = False  # in the search; the machine checked again after its speed moved
        self.first: Trial | None = None  # the remembered result, when it missed as timed now: the search starts from it
        self.outcome = f"{self.clock.prefix}result {target.describe()} {json.dumps(chooser.describe(), sort_keys=True)}"

    @functools.cached_property
    def model(self) -> costmodel.LatencyModel:
        """The latency model (timings of the model's own layers), built when a search needs it."""
        return costmodel.LatencyModel(self.a.deps, self.a.flops, self.a.gm, self.original_ms, self.setting, self.cache,
                                      self.chooser.rule.round_to, self.overdue)

    @functools.cached_property
    def scores(self) -> dict[int, torch.Tensor]:
        """The selector's scores; one that ranks by cost gets the latency model."""
        cost = self.model if getattr(self.chooser.selector, "uses_cost", False) else None
        return self.chooser.scores(self.a.deps, self.a.gm, self.seed, cost=cost)

    def run(self) -> tuple[Plan, torch.fx.GraphModule, dict[str, Any]]:
        chosen, trials, third = self.remembered(), [], None  # third: the note of the result's third timing (``Clock.settled``)
        confirmed = chosen is not None  # and its comparison is the confirming timing
        for fresh in (True,) if self.first else (False, True):
            if chosen is None:
                trials = self.searched()
                met = [t for t in trials if t.comparison.meets(self.goal)]
                roomy = [t for t in met if spared(t, self.goal)] or met  # room for the machine to move
                chosen = self.refuse(trials) if not met else nearer(self, max(roomy, key=lambda t: t.ratio), trials)
            c, cached = chosen.comparison, self.claimed if confirmed else chosen.comparison.speedup if chosen.cached else None
            if chosen.comparison.rounds == 0:  # nothing removed: 1x by definition
                break
            if not confirmed:
                c, third = self.clock.settled(chosen, self.clock.confirm(chosen.plan, "confirming the result against the original: its "
                                                                         "speed-up is what the report gives", self.original_ms, chosen.ratio),
                                              self.original_ms, self.goal, self.target.on_noise)
            if spared(c, self.goal) or fresh or self.target.on_noise == "warn":
                break
            log.warning("the %s timing of this result (%s) %s when timed again (%s): searching afresh, from that timing",
                        "cached" if chosen.cached else "first", chosen.comparison.describe(),
                        "did not hold" if c.ratio > self.goal else f"held by under {SPARE:.0%}", c.describe())
            self.clock.drop()
            self.first, chosen, confirmed = dataclasses.replace(chosen, comparison=c, cached=False), None, False
        if c.ratio > self.goal and chosen.comparison.rounds:  # what the report would give misses the goal
            raise_or_warn(self.target.on_noise, MeasurementError(
                f"the result timed {chosen.comparison.speedup:.3g}x in the search and {c.speedup:.3g}x when timed again to confirm it, short of "
                f"the {1 / self.goal:.3g}x asked: the machine's speed on {self.setting.device} moved under the compile, which searches again "
                "from such a timing once. Close other work and compile again, or prune to FLOPs (target_gflops= or ratio=); "
                "on_noise='warn' returns the result with a warning.", interval=(1 / c.high, 1 / c.low), noise=c.noise))
        if c.ratio <= self.goal and chosen.comparison.rounds and (self.step or not far(c, self.goal)):
            # returned as meeting it: a warm compile times it first; one far past the target only where the speed steps
            self.cache.put(self.setting, self.outcome, [self.budgets[widths(chosen.plan)], widths(chosen.plan), c.speedup,
                                                        fingerprint(self.scores), chosen.plan.to_json(), chosen.estimate])
        record = {"target": {"speedup": self.target.speedup, "latency_ms": self.target.latency_ms}, "goal_ms": self.goal * self.original_ms,
                  "before_ms": c.before.median_ms, "after_ms": c.after.median_ms, "speedup": c.speedup,
                  "interval": [1 / c.high, 1 / c.low], "confidence": CONFIDENCE, "noise": max(c.noise, self.noise),
                  "comparison_rounds": c.rounds, "estimated_speedup": 1 / chosen.estimate, "cached_speedup": cached,
                  "batch": c.before.batch, "device": self.setting.device, "device_name": self.setting.device_name,
                  "threads": self.setting.threads, "dtype": self.setting.dtype, "timings_taken": self.cache.measured, "rounds": self.timed,
                  "results_timed": self.clock.timed,
                  "notes": overshoot(chosen, c, trials, self.goal, self.step) + self.notes + ([third] if third else [])
                  + speeds(([self.original_ms] if self.noise <= STABLE else []) + self.clock.originals,  # the steady timings' originals
                           [c] if chosen.cached else [chosen.comparison, c], self.setting.threads)}
        if "model" in self.__dict__:  # a remembered result builds no latency model
            names = {n.name: name for n, (name, _) in layers(self.a.gm).items()}
            removed = removed_mask(self.a.deps, chosen.plan)
            record["layers_ms"] = {names.get(node, node): ms for node, ms in self.model.layers(removed).items()}
        return chosen.plan, self.clock.result(chosen.plan)[0], record

    def plan(self, budget: float) -> Plan:
        plan = select_plan(self.a, self.chooser, budget, self.scores, self.model)
        self.budgets.setdefault(widths(plan), budget)
        return plan

    def remembered(self) -> Trial | None:
        """The result an earlier compile chose for this model, target and strategy, when it still meets the goal as timed now."""
        kept = self.cache.lookup(self.setting, self.outcome)
        if kept is None or len(kept) != 6:
            return None
        budget, chosen, self.claimed, scored, plan_json, estimate = kept
        if scored != fingerprint(self.scores):  # other weights or data: the kept positions are not this model's choice
            return None
        plan = Plan.from_json(plan_json)
        self.budgets.setdefault(chosen, budget)
        c = self.clock.confirm(plan, "an earlier compile chose a result for this target here: confirming it against the original",
                               self.original_ms, 1 / self.claimed)
        if c.meets(self.goal) is None:  # the noise hid the goal: a burst may pass, and a search would time in it too
            c = self.clock.confirm(plan, f"  it cannot be told from the target now (A/A noise {c.noise:.1%}): timing it once more",
                                   self.original_ms, c.ratio)
        timed = Trial(plan, c, estimate, False)
        if (verdict := c.meets(self.goal)) is False:  # the machine runs otherwise than when it was chosen: so did the cached comparisons
            self.clock.drop()
        if not verdict:
            log.info("  it %s the target now: searching afresh from it", "misses" if verdict is False else "cannot be told from")
            self.first = timed
        return timed if verdict else None

    def trial(self, plan: Plan, why: str, turn: int = 1, earlier: Iterable[Trial] = ()) -> Trial:
        """``plan`` timed against the original, with a line that says why; at its first turn, again when far from the model's
        estimate and from it as far off as the ``earlier`` timings of this search (their median measured over estimated ratio)."""
        removed = removed_mask(self.a.deps, plan)
        estimate = self.model.cost(removed) / self.model.total
        if not bool(removed.any()):
            return Trial(plan, Comparison.identical(self.original), 1.0, False)
        self.timed += 1
        log.info("candidate %d (%s): %.0f%% of the FLOPs removed, %.3gx estimated; timing it against the original (%s)",
                 self.timed, why, 100 * self.removed(plan), 1 / estimate, span(LIMITS[turn == 1], self.original_ms, estimate))
        c, cached = self.clock.compare(plan, self.goal, turn)
        bias = [t.ratio / t.estimate for t in earlier if t.comparison.rounds]
        expected = [estimate] + ([estimate * statistics.median(bias)] if bias else [])
        if turn == 1 and not any(1 / BAND <= c.ratio / e <= BAND for e in expected):
            log.info("  measured %.3gx against %s expected: timing it again before believing it", c.speedup, " or ".join(f"{1 / e:.3g}x" for e in expected))
            c, cached = self.clock.compare(plan, self.goal, turn=2)
        if not cached and self.drifted(c.before.median_ms):
            log.info("  the original took %.4g ms here against %.4g ms when the machine was checked: the load changed; timing it again",
                     c.before.median_ms, self.original_ms)
            c, cached = self.clock.compare(plan, self.goal, turn=turn + 3)
            if self.drifted(c.before.median_ms):
                if self.searching and not self.rechecked:
                    raise _Moved(c.before.median_ms, Trial(plan, c, estimate, cached))
                raise_or_warn(self.target.on_noise, MeasurementError(
                    f"the machine's load changed during the search on {self.setting.device}: the original took {c.before.median_ms:.4g} ms while a "
                    f"candidate was timed, against {self.original_ms:.4g} ms when the machine was checked, twice. Ratios timed under another load "
                    "do not hold on a quiet machine (other work stalls a small model more than a large one). Close other work and compile "
                    "again, use threads=1, or prune to FLOPs (target_gflops= or ratio=).", interval=(1 / c.high, 1 / c.low), noise=c.noise))
        verdict = {True: "meets", False: "misses", None: "cannot be told from"}[c.meets(self.goal)]
        log.info("  %s%s: %s the %.3gx asked", c.describe(), " (cached)" if cached else "", verdict, 1 / self.goal)
        return Trial(plan, c, estimate, cached)

    def overdue(self, why: str = "the layer timings take longer than estimated") -> None:
        """The layer timings run late or slow (``why``): ``MeasurementError`` when the machine is now too busy to decide."""
        log.info("%s: checking the machine again", why)
        machine = check(self.a.model, self.a.inputs)
        ms = machine.original.median_ms
        why = machine.refusal() or (f"the original now takes {ms:.4g} ms against {self.original_ms:.4g} ms at the start: the load "
                                    "changed" if self.drifted(ms) else None)
        undecidable(why, machine.noise, self.target, self.setting.device)

    def drifted(self, original_ms: float) -> bool:  # the original ran ``DRIFT`` times off the machine check's milliseconds
        return not 1 / DRIFT <= original_ms / self.original_ms <= DRIFT

    def searched(self) -> list[Trial]:
        """The search; once, when the original's speed moved for good during it (the machine changed speed, or its load
        did and stayed), the machine checked again and the search run afresh at the new speed, from the timing that found it
        when the check finds the original at that timing's speed (else without it: a load that has left flattened it).
        When the original now runs ``DRIFT`` times faster, the layers were timed under a load that has left (other work stalls small layers
        most, which flattened the latency model's estimates: under the spin load ResNet-18's plan with 60% of the FLOPs removed
        was estimated 1.28x and timed 1.9x quiet): their timings are taken off the cache and the latency model is built anew."""
        self.searching = True
        try:
            return self.search()
        except _Moved as moved:
            self.rechecked = True
            log.info("the original took %.4g ms, twice, against %.4g ms when the machine was checked: checking it again and "
                     "searching afresh at its new speed", moved.ms, self.original_ms)
            machine = check(self.a.model, self.a.inputs)
            undecidable(machine.refusal(), machine.noise, self.target, self.setting.device)
            was = self.original_ms  # the original's speed when the layers were timed
            self.original, self.noise, self.original_ms = machine.original, machine.noise, machine.original.median_ms
            self.goal = self.target.latency_ms / self.original_ms if self.target.latency_ms is not None else self.goal
            self.aim = self.goal * (1 - MARGIN)
            self.clock.drop()
            if self.original_ms * DRIFT < was and "model" in self.__dict__:  # the load they were timed under has left
                log.info("the original runs %.3g times as fast as when the layers were timed: timing them again for the latency model",
                         was / self.original_ms)
                self.cache.withdraw()
                for built in ("model", "scores") if getattr(self.chooser.selector, "uses_cost", False) else ("model",):
                    self.__dict__.pop(built, None)  # built again when next asked for
            if not self.drifted(moved.ms):  # the speed it was timed at, checked: else timed under a load that has left
                self.first = moved.trial
            log.info("  the original takes %.4g ms now: searching %s that candidate's timing", self.original_ms,
                     "from" if self.first else "without")
            return self.search()
        finally:
            self.searching = False

    def search(self) -> list[Trial]:
        budget, smallest, why = self.aim * self.model.total, False, "the latency model's plan for the target"
        trials: list[Trial] = []
        seen: dict[str, Trial] = {}
        if self.first is not None:  # estimated again by this latency model
            first, self.first = self.first, None
            trials.append(dataclasses.replace(first, estimate=self.model.cost(removed_mask(self.a.deps, first.plan)) / self.model.total))
            seen[widths(first.plan)] = trials[0]
            budget, why = next_budget(trials, decidable_aim(trials, self.aim, self.goal), self.model.total) or (budget, why)
        while len(seen) < ROUNDS and len(trials) < 2 * ROUNDS:
            try:
                plan = self.plan(budget)
            except TargetUnreachableError as exc:
                if smallest:
                    break
                budget, smallest, why = self.model.total / exc.best_speedup, True, "the smallest plan the widths allow"
                plan = self.plan(budget)
            key = widths(plan)
            trial = seen.get(key) or self.trial(plan, why, earlier=seen.values())
            if key not in seen:
                trial = self.ordered(trial, list(seen.values()))
            seen[key] = trial
            trials.append(trial)
            aim = decidable_aim(trials, self.aim, self.goal)
            if trial.comparison.meets(self.goal) and trial.ratio >= 0.94 * aim and spared(trial, self.goal):
                break
            self.step = stepped(trials, aim)
            if self.step or (proposal := next_budget(trials, aim, self.model.total)) is None:
                break
            budget, why = proposal
        return trials

    def ordered(self, trial: Trial, earlier: list[Trial]) -> Trial:
        """``trial``, after re-timing it and any earlier trial whose timing contradicts the width order;
        ``MeasurementError`` when the two still contradict each other (the machine changed under the search)."""
        for other in earlier:
            wide, narrow = (trial, other) if trial.wider(other) else (other, trial) if other.wider(trial) else (None, None)
            if wide is None or not contradict(wide, narrow):
                continue
            log.info("  a plan with more channels timed faster than one with fewer (%.3gx against %.3gx): timing both again",
                     wide.comparison.speedup, narrow.comparison.speedup)
            wide2, narrow2 = (self.trial(t.plan, "timed again: the width order", turn=3) for t in (wide, narrow))
            if contradict(wide2, narrow2):
                c = wide2.comparison
                raise MeasurementError(
                    f"the timings contradict the widths on {self.setting.device}: a result with more channels in every group measured "
                    f"{c.speedup:.3g}x, one with fewer {narrow2.comparison.speedup:.3g}x, twice; the machine's load changed under the search. "
                    "Close other work and compile again, or prune to FLOPs (target_gflops= or ratio=).", interval=(1 / c.high, 1 / c.low), noise=c.noise)
            return wide2 if trial is wide else narrow2
        return trial

    def refuse(self, trials: list[Trial]) -> Trial:
        """No result met the goal: the noise error when the best one was undecided, else the unreachable one;
        with ``on_noise="warn"``, an undecided best result whose median meets the goal is returned instead."""
        c = (best := min(trials, key=lambda t: t.ratio)).comparison
        asked = f"{self.target.describe()} ({1 / self.goal:.3g}x faster than the original's {self.original_ms:.4g} ms)"
        if c.meets(self.goal) is None:
            message = (f"the machine was too noisy to tell whether a result meets {asked} on {self.setting.device}: the best one "
                       f"measured {c.describe()}. Close other work on the machine and compile again, ask for a target the noise "
                       "cannot hide (a smaller speed-up), or prune to FLOPs (target_gflops= or ratio=), which needs no timing; "
                       "on_noise='warn' returns that result with a warning.")
            return too_noisy(message, best, self.target.on_noise == "warn" and c.ratio <= self.goal)
        raise TargetUnreachableError(
            f"the latency target {asked} is out of reach on {self.setting.device}: the best speed-up measured ({len(trials)} results "
            f"timed) was {c.speedup:.3g}x ({c.after.median_ms:.4g} ms, {self.chooser.rule}; {CONFIDENCE:.0%} interval "
            f"{1 / c.high:.3g}-{1 / c.low:.3g}x). Ask for at most that, lower min_width/round_to, or un-freeze groups (see analyze()).",
            best_speedup=c.speedup)

    def removed(self, plan: Plan) -> float:  # the share of the FLOPs ``plan`` removes
        return 1 - self.a.flops.macs(removed_mask(self.a.deps, plan)) / self.a.flops.total


@dataclasses.dataclass
class _Moved(Exception):
    """The original ran ``DRIFT`` times off its checked speed twice in a row (``ms`` the last time, in ``trial``'s timing)."""
    ms: float
    trial: Trial
