"""How long does a latency target take to compile, with an empty and with a warm timing cache, and does
what it reports hold when the result is timed again?

For each case (model, input size, batch, speed-up), in one process, on a fresh cache folder
(``FXPRUNE_CACHE_DIR`` points at a new temporary directory): ``compile(model, speedup=S)`` with the
cache empty, then the same call again (warm cache). Each result is then timed again against the
original in interleaved rounds (``fxprune.latency.timing.compare``, at least --rounds rounds, until its
interval is within 5%; every round kept: the median needs no burst filter), and once more the same way
right after, which shows how far the machine's speed moves between two timings seconds apart; the original's
milliseconds in the report and in the first re-measurement say whether the machine ran at another speed between
them (docs/latency.md, "Two speeds of two threads"). A row holds
when its compile took at most the case's limit (warm: 30 s and no longer than cold), the first re-measured
speed-up is at least the target and within 5% of what the compile reported.

    python benchmarks/latency_compile_time.py                   # the three README cases
    python benchmarks/latency_compile_time.py --cases resnet18:112:1:1.25:60 --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
import torchvision
from tabulate import tabulate

import fxprune
from fxprune.latency.timing import compare, threads

CASES = "resnet18:112:1:1.25:60,resnet50:224:1:2:120,mobilenet_v2:224:8:2:180"
"""model:size:batch:speedup:seconds allowed with an empty cache."""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=CASES, help="comma-separated model:size:batch:speedup:seconds")
    ap.add_argument("--threads", type=int, default=None, help="compile's threads= (default: torch's count)")
    ap.add_argument("--rounds", type=int, default=15, help="least interleaved rounds of each re-measurement")
    args = ap.parse_args()
    rows = []
    for case in args.cases.split(","):
        name, size, batch, speedup, limit = case.split(":")
        size, batch, speedup, limit = int(size), int(batch), float(speedup), float(limit)
        os.environ["FXPRUNE_CACHE_DIR"] = tempfile.mkdtemp(prefix="fxprune-cache-")
        model = torchvision.models.get_model(name, weights=None).eval()
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
        cold_s = None
        for cache in ("empty", "warm"):
            start = time.perf_counter()
            try:
                pruned = fxprune.compile(model, speedup=speedup, example_inputs=x, threads=args.threads)
            except fxprune.FxPruneError as exc:
                rows.append([name, f"{batch}x{size}", f"{speedup:g}", cache, f"{time.perf_counter() - start:.1f}", "-", "-", "-", "-", "-", "-",
                             f"{type(exc).__name__}: {str(exc)[:80]}", "NO"])
                print(tabulate(rows[-1:], tablefmt="plain"), file=sys.stderr, flush=True)
                print(f"  {name} {cache}: {exc}", file=sys.stderr, flush=True)  # the whole message: its figures say why
                continue
            seconds = time.perf_counter() - start
            lat = fxprune.report(pruned).latency
            with threads(args.threads):
                again, twice = (compare(model, pruned, (x,), rounds=args.rounds, most=4 * args.rounds, burst=1.0) for _ in range(2))
            flops = fxprune.report(pruned).flops
            ok = (seconds <= (limit if cache == "empty" else min(30.0, cold_s or seconds)) and again.speedup >= speedup
                  and abs(lat["speedup"] / again.speedup - 1) <= 0.05)
            cold_s = seconds if cache == "empty" else cold_s
            rows.append([name, f"{batch}x{size}", f"{speedup:g}", cache, f"{seconds:.1f}", f"{lat['speedup']:.3g}x",
                         f"{again.speedup:.3g}x ({1 / again.high:.3g}-{1 / again.low:.3g})", f"{twice.speedup:.3g}x",
                         f"{lat['before_ms']:.4g} / {again.before.median_ms:.4g}", f"{1 - flops[1] / flops[0]:.0%}",
                         lat["results_timed"], "", "yes" if ok else "NO"])
            print(tabulate(rows[-1:], tablefmt="plain"), file=sys.stderr, flush=True)
    with threads(args.threads) as count:
        print(f"{count} threads, torch {torch.__version__}; re-measured in interleaved rounds right after each compile")
    print(tabulate(rows, headers=["model", "input", "speedup", "cache", "compile s", "reported", "re-measured (95% interval)",
                                  "again", "original ms (report / re-measure)", "FLOPs removed", "results timed", "error", "holds"],
                   tablefmt="github"))
    return 0 if all(r[-1] == "yes" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
