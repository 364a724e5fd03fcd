"""nearer: a latency search's result far past its target traded for one nearer it, or the reason there is none.

The search returns the slowest result that meets the goal. One more than ``OVERSHOOT`` times faster than asked
costs the user channels for nothing, so before it is returned the wider results that missed are timed again
(the noise may have misjudged them) and plans between are tried; it stays only when the speed steps from it to
the next wider plan, which the report then states (``Search.step``), or when the noise leaves the nearer plans
undecided (``MeasurementError``, or with ``on_noise="warn"`` a warning).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .trials import OVERSHOOT, Trial, far, keeping_more, too_noisy

if TYPE_CHECKING:
    from .latency import Search

__all__ = ["nearer", "BISECT", "STEP"]

BISECT = 4
"""Plans between a result far past the target and the nearest that misses it, tried at most."""

STEP = 0.03
"""A result far past the target is returned at once when a plan that removes at most this share fewer
of the FLOPs missed it: nothing lies between (MobileNetV2 at batch 8: 55% removed 2.9x, 53% 1.8x)."""


def nearer(search: Search, chosen: Trial, trials: list[Trial]) -> Trial:
    """``chosen``, unless it is more than ``OVERSHOOT`` times faster than asked and no plan that removed at most ``STEP``
    fewer of the FLOPs missed: then the nearest results that missed and keep more (``keeping_more``) are timed again (two
    at most), and plans between tried by bisection (``BISECT`` at most) until one meets within ``OVERSHOOT``, or none lies
    between (``search.step``: the report says why); one the noise leaves undecided: too noisy to find a result near the target."""
    if not far(chosen, search.goal):
        return chosen
    gone = {id(t): search.removed(t.plan) for t in [*trials, chosen]}  # the share of the FLOPs each plan removes
    lighter = max((t for t in trials if gone[id(t)] < gone[id(chosen)]), key=lambda t: gone[id(t)], default=None)
    if lighter is not None and lighter.comparison.meets(search.goal) is False and gone[id(chosen)] - gone[id(lighter)] <= STEP:
        search.step = (f"a plan that removed fewer FLOPs ({gone[id(lighter)]:.0%} against {gone[id(chosen)]:.0%}) measured "
                       f"{lighter.comparison.speedup:.3g}x, short of the target: the speed steps with the layers' widths (the kernels "
                       "they run) more than with the FLOPs there")
        return chosen
    missed = keeping_more(chosen, trials, search.goal)
    undecided = []
    for t in [t for t in missed if t.comparison.rounds][:2]:  # a plan that removes nothing needs no timing
        again = search.trial(t.plan, "timed again: the result is far past the target", turn=3)
        trials.append(again)
        if verdict := again.comparison.meets(search.goal):
            return nearer(search, again, trials)
        undecided += [again] if verdict is None else []
    fast, slow = chosen, missed[0] if missed else None
    for _ in range(BISECT if slow is not None and not undecided and search.step is None else 0):  # a step measured: none between
        plan = search.plan(search.model.total * (fast.estimate + slow.estimate) / 2)
        if not search.removed(slow.plan) < search.removed(plan) < search.removed(fast.plan):  # not between the two
            search.step = (f"the nearest plan that keeps more measured {slow.comparison.speedup:.3g}x, short of the target, and the latency "
                           "model has no plan between the two: the allowed widths step from one to the other")
            break
        between = search.trial(plan, "between the fastest result that meets the target and the nearest that misses", earlier=trials)
        trials.append(between)
        verdict = between.comparison.meets(search.goal)
        if verdict is None:
            undecided.append(between)
            break
        fast, slow = (between, slow) if verdict else (fast, between)
        if verdict and not far(between, search.goal):
            return between
    if not undecided:
        return fast
    message = (f"the machine was too noisy to find a result near {search.target.describe()}: the results that met it measured "
               f"{fast.comparison.speedup:.3g}x and faster (more than {OVERSHOOT:g} times the target), and the one nearer it, "
               f"{undecided[0].comparison.describe()}, could not be told from the target. Close other work and compile again, or "
               "prune to FLOPs (target_gflops= or ratio=); on_noise='warn' returns the faster result with a warning.")
    too_noisy(message, undecided[0], search.target.on_noise == "warn")
    return fast
