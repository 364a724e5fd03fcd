"""intervals: distribution-free intervals of a median, and the one rule that decides a timing against a goal.

A timing is a sample of rounds (``timing.compare``): each round's ratio of the candidate to the original, and the
original's A/A ratio against itself (``round_ratios``). Decisions read the ratios' median through its interval
(``median_interval``: order statistics, no assumption about the distribution), widened by the A/A noise
(``aa_noise``): ``verdict`` says whether that interval clears a goal, and ``futile`` whether more rounds spread alike
could make it (``reachable_interval``). Pure arithmetic on numbers: no clock, no model.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

__all__ = ["CONFIDENCE", "median_interval", "reachable_interval", "verdict", "futile", "aa_noise", "round_ratios", "burst_limit"]

CONFIDENCE = 0.95
"""Coverage of the intervals of medians that decisions are taken on."""


def median_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """A distribution-free interval of the median of ``values``: the order statistics ``x(k)`` and
    ``x(n+1-k)`` with the largest ``k`` whose binomial coverage is at least ``confidence`` (for n = 11,
    the 2nd and the 10th of the sorted values); the whole range when there are too few values."""
    xs = sorted(values)
    n, k = len(xs), _rank(len(xs), confidence)
    return (xs[0], xs[-1]) if k == 0 else (xs[k - 1], xs[n - k])


def _rank(n: int, confidence: float) -> int:
    """The largest ``k`` whose order statistics ``x(k)``, ``x(n+1-k)`` of ``n`` values cover the median with ``confidence``."""
    tail, k, below = (1 - confidence) / 2, 0, 0.0
    while k < n and below + math.comb(n, k) / 2 ** n <= tail:
        below += math.comb(n, k) / 2 ** n
        k += 1
    return k


def reachable_interval(values: Sequence[float], n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The interval of the median that ``n`` values spread like ``values`` would give: the ranks of
    ``median_interval`` at ``n``, read as quantiles of ``values`` (what more rounds of the same timing can narrow it to)."""
    xs, k = sorted(values), max(_rank(n, confidence), 1)
    return _quantile(xs, (k - 1) / max(n - 1, 1)), _quantile(xs, (n - k) / max(n - 1, 1))


def _quantile(xs: list[float], p: float) -> float:
    """The ``p`` quantile of the sorted ``xs``, interpolated between neighbours."""
    i = p * (len(xs) - 1)
    lo = min(int(i), len(xs) - 1)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (i - lo)


def verdict(low: float, high: float, noise: float, goal: float) -> bool | None:
    """Whether an interval ``low``-``high`` of a ratio, widened by the A/A ``noise``, lies wholly at or below ``goal``
    (True), wholly above it (False), or holds it (None): the rule every decision on a timing takes."""
    if high * (1 + noise) <= goal:
        return True
    if low * (1 - noise) > goal:
        return False
    return None


def futile(ratios: Sequence[float], aa: Sequence[float], n: int, goal: float) -> bool:
    """Whether ``n`` rounds whose ratios and A/A ratios spread like ``ratios`` and ``aa`` (``round_ratios``) would still
    leave ``goal`` inside the ratio's interval widened by the A/A noise: ``Comparison.meets`` undecided if the rest fell alike."""
    return verdict(*reachable_interval(ratios, n), aa_noise(aa, n), goal) is None


def aa_noise(aa: Sequence[float], n: int | None = None) -> float:
    """The noise of A/A ratios (a model timed against itself): the relative half-width of their median's interval
    (``n``: the interval that many ratios spread alike would give, ``reachable_interval``)."""
    low, high = median_interval(aa) if n is None else reachable_interval(aa, n)
    return (high - low) / 2 / statistics.median(aa)


def round_ratios(first: Sequence[float], cand: Sequence[float], second: Sequence[float]) -> tuple[list[float], list[float]]:
    """Each round's ratio (the candidate over the mean of the original's two timings around it) and A/A ratio."""
    return [c / ((a + b) / 2) for a, b, c in zip(first, second, cand)], [b / a for a, b in zip(first, second)]


def burst_limit(aa: Sequence[float], burst: float) -> float:
    """How far an A/A ratio may be from 1 before its round counts as a burst: ``burst``, or three times the rounds'
    median distance where the machine's every pair differs more (a burst stands out from its usual noise)."""
    return max(burst, 3 * statistics.median(abs(r - 1) for r in aa))
