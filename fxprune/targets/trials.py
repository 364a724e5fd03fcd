"""trials: the candidates of a latency search, each a plan timed against the original (``Clock``).

A ``Trial`` keeps its plan, its comparison and the latency model's estimate; ``Clock`` times plans
against the original, keeps stable comparisons in the ``TimingCache`` under the captured architecture
and the plan's widths, and confirms the chosen one; ``contradict`` says when two timings go against
the width order; ``far`` and ``overshoot`` say when, and why, a result lies far past its target.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import statistics
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn

from ..core.groups import Plan
from ..errors import MeasurementError
from ..latency.cache import TimingCache
from ..latency.timing import FEWEST, MIN_MS, STABLE, WARMUP, Comparison, Setting, compare
from ..passes.rewrite import rewrite
from ..pipeline import Analysis
from .target import Target

__all__ = ["Trial", "Clock", "kept", "widths", "contradict", "fingerprint", "next_budget", "decidable_aim", "too_noisy", "undecidable", "raise_or_warn",
           "far", "spared", "overshoot", "stepped", "speeds", "span", "SPARE", "PRECISE", "ORDER", "OVERSHOOT", "NEAR", "STEPPED", "LIMITS",
           "CONFIRM", "SPEEDS"]

log = logging.getLogger("fxprune")

PRECISE = 0.025
"""The reported speed-up is timed until its interval is within this (relative half-width), so that
timing the result again gives the same figure to within a few percent."""

ORDER = 0.05
"""How much faster than a narrower plan a wider one may time (beyond the noise) before the two timings
are taken to contradict each other: kernels step with the width, so a few percent happen."""

SPARE = 0.03
"""A result meets its goal by at least this much (its median), half the aim's margin (``latency.MARGIN``): one that
close fails its target when the machine moves a few percent (ResNet-18 confirmed at 1.27x and 1.28x for 1.25x
re-measured 1.24x and 1.22x). The search stops only at such a result and prefers it, and a confirmed result that is
not one is searched past once."""

OVERSHOOT = 1.3
"""A result more than this many times faster than asked is returned only when the widths force the step."""

NEAR = 0.02
"""The search stops once the closest results on either side of the aim are estimated this close: the
latency model cannot order plans nearer than that (its layers are timed alone), so further candidates
would be timed for nothing."""

STEPPED = 5.0
"""The search also stops when the closest results on either side of the aim are estimated within twice
``NEAR`` (one more halving from where it stops anyway) and their measured ratios differ this many times as
much: the machine's speed steps between them where the latency model sees none, and plans it puts between
them time as one or the other (MobileNetV2 at batch 8, where a tensor over 32 MiB is page-faulted on every
call: plans estimated 1.90x and 1.96x timed 1.95x and 2.87x, and the two timed between them 1.90x and 1.94x)."""


LIMITS = {True: (FEWEST, 20, 10.0), False: (FEWEST, 30, 15.0)}
"""A candidate's timing against the goal, its first (True) and later ones: (fewest rounds, most rounds, seconds
of timed calls after which it stops once it has its fewest)."""

CONFIRM = (2 * FEWEST, 60, 5.0)
"""The same for the confirming timing, which goes on until its interval is within ``PRECISE``."""

SPEEDS = 1.15
"""Steady timings of one compile whose originals took this many times as long as each other caught the machine at
two speeds: a cost it adds to every call compresses a small model's speed-up (ResNet-18 at 112x112 on 2 threads:
the original 10.2-10.8 ms and one plan 1.47-1.51x, or 12.2-13.2 ms and 1.28-1.39x, for seconds to minutes each),
which the report says (``speeds``); within one speed the original's timings varied by 8% at most."""


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

    def wider(self, other: Trial) -> bool:
        """Every group keeps at least as many channels here as in ``other``, and some group more (a group
        a plan does not name is kept whole)."""
        mine, theirs = kept(self.plan), kept(other.plan)
        return mine != theirs and all(mine.get(g, math.inf) >= theirs.get(g, math.inf) for g in {*mine, *theirs})


class Clock:
    """Comparisons of pruned candidates with the original, kept in the ``TimingCache`` under the captured
    architecture and the candidate's widths when they are stable."""

    def __init__(self, a: Analysis, setting: Setting, cache: TimingCache, burst: float) -> None:
        self.a, self.setting, self.cache, self.burst = a, setting, cache, burst
        parts = [a.gm.code, *(f"{n}{list(t.shape)}" for n, t in (*a.gm.named_parameters(), *a.gm.named_buffers())),
                 *(f"{list(t.shape)} {t.dtype}" for t in a.inputs if isinstance(t, torch.Tensor))]
        self.prefix = f"model {hashlib.sha1(chr(10).join(parts).encode()).hexdigest()} "
        self.timed = 0
        self.pruned: dict[str, tuple[torch.fx.GraphModule, nn.Module]] = {}  # widths -> (rewritten graph, result)
        self.originals: list[float] = []  # the original's milliseconds in each steady timing taken (``speeds``)

    def result(self, plan: Plan) -> tuple[torch.fx.GraphModule, nn.Module]:
        key = widths(plan)
        if key not in self.pruned:
            pruned = rewrite(self.a.gm, self.a.deps, plan, self.a.modules)
            self.pruned[key] = pruned, self.a.result(pruned)
        return self.pruned[key]

    def compare(self, plan: Plan, goal: float, turn: int = 1) -> tuple[Comparison, bool]:
        """``plan``'s result against the original (``turn``: the how-manieth timing of this pair; later
        ones may take more rounds: ``LIMITS``); whether it was read from the cache."""
        def measure() -> list[Any]:
            self.timed += 1
            rounds, most, seconds = LIMITS[turn == 1]
            return self.noted(compare(self.a.model, self.result(plan)[1], self.a.inputs, goal=goal, rounds=rounds, most=most,
                                     seconds=seconds, burst=self.burst)).to_row()

        timed = self.timed
        row = self.cache.get(self.setting, f"{self.prefix}widths {widths(plan)} timing {turn}", measure,
                             lambda r: Comparison.from_row(r, self.setting).stable)
        self.cache.save()
        return Comparison.from_row(row, self.setting), self.timed == timed

    def confirm(self, plan: Plan, why: str, original_ms: float, ratio: float) -> Comparison:
        """The timing reported for the chosen result: against the original, never cached, until its interval is
        within ``PRECISE`` (or 5 s of timed calls have passed); logged with ``why`` and how long it may take."""
        self.timed += 1
        log.info("%s (%s)", why, span(CONFIRM, original_ms, ratio))
        rounds, most, seconds = CONFIRM
        c = self.noted(compare(self.a.model, self.result(plan)[1], self.a.inputs, rounds=rounds, most=most, seconds=seconds,
                              precision=PRECISE, burst=self.burst))
        log.info("  %s", c.describe())
        return c

    def settled(self, chosen: Trial, c: Comparison, original_ms: float, goal: float, on_noise: str) -> tuple[Comparison, str | None]:
        """``c``, the confirming timing of ``chosen``; when it and ``chosen``'s own timing ``disagree``, or when a noisy machine
        (A/A beyond ``STABLE``) left it undecided, of ``c`` and a third timing the one nearer the median of the three that the
        noise did not leave undecided, so that a timing taken while the machine ran otherwise (a burst, the allocator's state)
        does not set the report alone, with a note that gives all three; ``MeasurementError`` when the noise left both undecided
        (``on_noise="warn"``: a warning, and the nearer one)."""
        def undecided(t: Comparison) -> bool:
            return t.noise > STABLE and t.meets(goal) is None

        if not disagree(chosen.comparison, c) and not undecided(c):
            return c, None
        why = f"the noise left it undecided (A/A {c.noise:.0%})" if undecided(c) else "each outside the other's interval"
        again = self.confirm(chosen.plan, f"it timed {chosen.comparison.speedup:.3g}x in the search and {c.speedup:.3g}x now, {why}: timing "
                             "it a third time", original_ms, c.ratio)
        middle = statistics.median([chosen.ratio, c.ratio, again.ratio])
        reported = min([t for t in (again, c) if not undecided(t)] or [again, c], key=lambda t: abs(t.ratio - middle))
        if undecided(reported):
            raise_or_warn(on_noise, MeasurementError(
                f"the machine was too noisy to confirm the result on {self.setting.device}: it timed {chosen.comparison.speedup:.3g}x in the "
                f"search, then {c.describe()} and {again.describe()}, neither told from the {1 / goal:.3g}x asked. Close other work and "
                "compile again, or prune to FLOPs (target_gflops= or ratio=); on_noise='warn' returns it with a warning.",
                interval=(1 / reported.high, 1 / reported.low), noise=reported.noise))
        return reported, (f"the result timed {chosen.comparison.speedup:.3g}x in the search, then {c.speedup:.3g}x and {again.speedup:.3g}x: "
                          f"the machine ran otherwise during one of them, and the report gives {reported.speedup:.3g}x, the nearer the middle")

    def noted(self, c: Comparison) -> Comparison:
        """``c``, its original's milliseconds noted when the timing was steady (``originals``)."""
        if c.noise <= STABLE:
            self.originals.append(c.before.median_ms)
        return c

    def drop(self) -> None:
        """Forget every cached comparison of this architecture."""
        self.cache.drop(self.setting, self.prefix)
        self.cache.save()


def span(limits: tuple[int, int, float], original_ms: float, ratio: float) -> str:
    """About how long a comparison with these ``LIMITS`` (or ``CONFIRM``) takes, its fewest rounds to its most, for
    an original of ``original_ms`` and a result ``ratio`` as fast: each round times the original twice and the
    result once, a timing at least ``MIN_MS`` of calls, and it stops after ``seconds`` of them once it may; each model
    is called ``WARMUP`` times before, and once more to size its timings."""
    rounds, most, seconds = limits
    one = (2 * max(original_ms, MIN_MS) + max(ratio * original_ms, MIN_MS)) / 1e3
    warmup = (WARMUP + 1) * (1 + ratio) * original_ms / 1e3
    return f"{rounds}-{most} rounds, {warmup + rounds * one:.2g}-{warmup + min(most * one, max(seconds, rounds * one) + one):.2g} s"


def speeds(originals: list[float], result: list[Comparison], threads: int) -> list[str]:
    """A note when the ``originals`` (milliseconds of steady timings of one compile) lie more than ``SPEEDS`` apart:
    the machine ran at two speeds, and the ``result``'s speed-up, timed at one or both, moves with them."""
    if len(originals) < 2 or max(originals) <= SPEEDS * min(originals):  # none steady on a noisy machine: nothing to say
        return []
    low, high = min(originals), max(originals)
    timed = ", ".join(f"{c.speedup:.3g}x with the original at {c.before.median_ms:.4g} ms" for c in result if c.rounds)
    fewer = ", and fewer threads may steady it (threads=1 runs a call on one core)" if threads > 1 else ""
    return [f"the original took {low:.4g}-{high:.4g} ms in this compile's steady timings at {threads} threads: the machine ran at more "
            f"than one speed, and a cost it adds to every call moves a small model's speed-up most (this result: {timed}). A machine "
            f"that does so where the result runs moves its speed-up the same way{fewer}."]


def kept(plan: Plan) -> dict[int, int]:
    return {gid: len(kept) for gid, kept in plan.keep.items()}


def widths(plan: Plan) -> str:
    return json.dumps(dict(sorted(kept(plan).items())), separators=(",", ":"))


def contradict(wide: Trial, narrow: Trial) -> bool:
    """``wide`` (more channels) timed faster than ``narrow`` beyond both intervals, the noise and ``ORDER``."""
    w, n = wide.comparison, narrow.comparison
    return w.rounds > 0 and n.rounds > 0 and w.high * (1 + w.noise) < n.low * (1 - n.noise) * (1 - ORDER)


def fingerprint(scores: dict[int, torch.Tensor]) -> str:
    """A digest of the selector's scores: a remembered result's positions hold for the model that scored them so."""
    digest = hashlib.sha1()
    for gid in sorted(scores):
        digest.update(f"{gid}:".encode())
        digest.update(scores[gid].detach().to(torch.float64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def next_budget(trials: list[Trial], aim: float, total: float) -> tuple[float, str] | None:
    """The next estimated-ms budget and why: the last estimate corrected by aim / measured (at most 2x
    either way), or, once results lie on both sides of the aim, linear interpolation between the closest
    pair; None once that pair's estimates are within ``NEAR`` of each other."""
    pair, last = _closest_pair(trials, aim), trials[-1]
    if pair is None:
        side = "slower" if last.ratio > aim else "faster"
        return (total * last.estimate * min(2.0, max(0.5, aim / last.ratio)),
                f"the last one timed {side} than aimed at, {last.comparison.speedup:.3g}x against {1 / aim:.3g}x")
    (e0, m0), (e1, m1) = ((t.estimate, t.ratio) for t in pair)
    if abs(e1 - e0) < NEAR * e1:  # the model cannot order plans this close: no more candidates
        return None
    if e1 <= e0:  # a costlier estimate measured faster: look just above the best fast one
        return total * e0 * 1.02, "just wider than the slowest that met the aim"
    w = min(0.9, max(0.1, (aim - m0) / (m1 - m0)))
    return total * (e0 + w * (e1 - e0)), f"between the closest pair, {1 / m0:.3g}x and {1 / m1:.3g}x"


def _closest_pair(trials: list[Trial], aim: float) -> tuple[Trial, Trial] | None:
    """The results nearest ``aim`` on either side by the latency model's estimate: (the costliest estimate that
    met the aim, the cheapest that missed it; ties by measured ratio), or None until both sides have one."""
    fast, slow = [t for t in trials if t.ratio <= aim], [t for t in trials if t.ratio > aim]
    if not fast or not slow:
        return None
    return max(fast, key=lambda t: (t.estimate, t.ratio)), min(slow, key=lambda t: (t.estimate, t.ratio))


def stepped(trials: list[Trial], aim: float) -> str | None:
    """Why no plan between the closest results on either side of ``aim`` is worth timing (``STEPPED``), or None."""
    pair = _closest_pair(trials, aim)
    if pair is None:
        return None
    f, s = pair
    apart = abs(s.estimate - f.estimate) / s.estimate
    if apart > 2 * NEAR or s.ratio - f.ratio <= STEPPED * max(apart, NEAR) * s.ratio:
        return None
    return (f"the nearest plan short of the target measured {s.comparison.speedup:.3g}x, and the latency model puts the two "
            f"{apart:.0%} apart: the speed steps between them (on the CPU, a tensor brought under 32 MiB, see the note on page "
            "faults, or a kernel that changes with the widths) where the model sees no step")


def decidable_aim(trials: list[Trial], aim: float, goal: float) -> float:
    """``aim``, lowered below each result that timed faster than it but could not be told from ``goal``, to
    where a result timed as loosely (its interval widened by the A/A noise, its quickest timings) would
    meet the goal; never nearer ``OVERSHOOT`` past the goal than ``aim`` is to it. Plans nearer the goal would
    time undecided too: on a machine noisier than the margin, the search went on to less pruned plans and refused."""
    lowest = goal * goal / (OVERSHOOT * aim)
    for t in trials:
        c = t.comparison
        if t.ratio <= aim and c.meets(goal) is None:
            aim = min(aim, max(lowest, t.ratio * goal / max(c.high * (1 + c.noise), c.floor)))
    return aim


def too_noisy(message: str, undecided: Trial, warn: bool) -> Trial:
    """``undecided`` with a warning that says ``message`` when ``warn``, else ``MeasurementError`` with its interval."""
    c = undecided.comparison
    raise_or_warn("warn" if warn else "raise", MeasurementError(message, interval=(1 / c.high, 1 / c.low), noise=c.noise))
    return undecided


def undecidable(why: str | None, noise: float, target: Target, device: str) -> None:
    """When ``why`` says the machine cannot decide ``target`` now: ``MeasurementError``, or with
    ``on_noise="warn"`` a warning, and the search goes on."""
    if why is not None:
        message = f"{target.describe()} cannot be decided on {device} now: {why}"
        raise_or_warn(target.on_noise, MeasurementError(message, noise=noise), f"{message} Searching anyway (on_noise='warn').")


def raise_or_warn(on_noise: str, error: MeasurementError, warning: str | None = None) -> None:
    """``error`` raised, or with ``on_noise="warn"`` a warning that says it (or ``warning``); the search goes on."""
    if on_noise != "warn":
        raise error
    warnings.warn(f"fxprune.compile: {warning or error}", stacklevel=6)


def disagree(a: Comparison, b: Comparison) -> bool:
    """Two timings of one plan whose medians each lie outside the other's interval: the machine ran otherwise
    during one of them."""
    return a.rounds > 0 and b.rounds > 0 and not a.low <= b.ratio <= a.high and not b.low <= a.ratio <= b.high


def spared(timed: Trial | Comparison, goal: float) -> bool:
    """Whether ``timed``'s median meets ``goal`` with ``SPARE`` to spare."""
    return timed.ratio <= goal * (1 - SPARE)


def keeping_more(chosen: Trial, trials: list[Trial], goal: float) -> list[Trial]:
    """The plans that missed ``goal`` or could not be told from it and keep more than ``chosen``, nearest first, one per
    widths: those ``wider`` than it where any is, else those the latency model estimates slower. Plans of two budgets
    need not nest (MobileNetV2 at batch 8: its plan with 54% of the FLOPs removed kept fewer channels in one layer than
    its 58% one), so the one that missed may be narrower somewhere and still keep more."""
    missed = [t for t in trials if not t.comparison.meets(goal)]
    more = [t for t in missed if t.wider(chosen)] or [t for t in missed if t.estimate > chosen.estimate]
    return sorted({widths(t.plan): t for t in more}.values(), key=lambda t: t.estimate)


def far(timed: Trial | Comparison, goal: float) -> bool:
    """Whether ``timed`` (a trial, or a comparison of its own) is more than ``OVERSHOOT`` times faster than the goal asks."""
    return timed.ratio * OVERSHOOT < goal


def overshoot(chosen: Trial, reported: Comparison, trials: list[Trial], goal: float, step: str | None) -> list[str]:
    """A note when the result, as ``reported`` (its confirming timing, the report's figure), is more than ``OVERSHOOT``
    times faster than asked for, and why: ``chosen`` is the result as the search timed it, ``step`` why no nearer
    plan was left to try."""
    if not far(reported, goal):
        return []
    if not far(chosen, goal):
        why = f"the search chose it at {chosen.comparison.speedup:.3g}x, and the machine's speed moved between that timing and this one"
    elif step:
        why = step
    elif not trials:
        why = "an earlier compile here chose it (the timing cache remembers its widths), and this one timed no other plan"
    elif more := keeping_more(chosen, trials, goal):
        why = (f"the plans between it and the nearest one that keeps more ({more[0].comparison.speedup:.3g}x) were not all tried within the "
               "candidates the search takes")
    else:
        why = "no plan that keeps more was found within the candidates the search takes"
    return [f"the result measured {reported.speedup:.3g}x, more than {OVERSHOOT:g} times the {1 / goal:.3g}x asked for: {why}"]
