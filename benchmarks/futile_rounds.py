"""How often does a timing with a goal decide, and in how many rounds, with and without the rule that
stops it once more rounds could not decide (``fxprune.latency.intervals.futile``, ``timing.PATIENCE``)?

Simulated rounds, no model and no clock: each round times the original twice and the candidate once, each
timing off by log-normal noise of the given spread, the candidate ``speedup`` times faster. The decision is
``intervals.verdict`` (``Comparison.meets`` without its quickest-quartile check), taken as ``timing.compare`` takes it for a
candidate's first timing: after 6 rounds, up to 20.

    python benchmarks/futile_rounds.py                     # noise 4% and 8%, patience 1, 2 and 4
    python benchmarks/futile_rounds.py --noise 0.06 --patience 4 --runs 4000
"""

from __future__ import annotations

import argparse
import random
import statistics

from tabulate import tabulate

from fxprune.latency.intervals import aa_noise, futile, median_interval, round_ratios, verdict
from fxprune.latency.timing import FEWEST, PATIENCE

GOAL = 0.5  # 2x asked
MOST = 20


def timed(rng: random.Random, speedup: float, spread: float, patience: float | None) -> tuple[bool | None, int]:
    """(meets, rounds) of one simulated timing; ``patience`` None: without the rule."""
    rounds: list[tuple[float, float, float]] = []
    while True:
        rounds.append((rng.lognormvariate(0, spread), rng.lognormvariate(0, spread) / speedup, rng.lognormvariate(0, spread)))
        if len(rounds) < FEWEST:
            continue
        ratios, aa = round_ratios(*zip(*rounds))
        meets = verdict(*median_interval(ratios), aa_noise(aa), GOAL)
        if meets is not None or len(rounds) >= MOST:
            return meets, len(rounds)
        if patience is not None and futile(ratios, aa, len(rounds) + int(patience * (MOST - len(rounds))), GOAL):
            return None, len(rounds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--noise", type=float, nargs="+", default=[0.04, 0.08], help="log-normal spread of each timing")
    ap.add_argument("--patience", type=float, nargs="+", default=[1, 2, PATIENCE], help="the rule's factors to compare")
    ap.add_argument("--runs", type=int, default=2000, help="simulated timings per cell")
    args = ap.parse_args()
    speedups = (1.9, 2.0, 2.05, 2.1, 2.15, 2.2, 2.3, 2.5)
    for spread in args.noise:
        rows = []
        for speedup in speedups:
            row: list[str] = [f"{speedup:g}x"]
            for patience in (None, *args.patience):
                rng = random.Random(1)
                runs = [timed(rng, speedup, spread, patience) for _ in range(args.runs)]
                decided = sum(m is not None for m, _ in runs) / len(runs)
                row.append(f"{decided:.1%} in {statistics.mean(n for _, n in runs):.1f}")
            rows.append(row)
        print(f"noise {spread:.0%}: share decided (meets or misses the 2x asked) in mean rounds, {args.runs} timings a cell")
        print(tabulate(rows, headers=["true speed-up", "without the rule", *(f"patience {p:g}" for p in args.patience)], tablefmt="github"))
        print()


if __name__ == "__main__":
    main()
