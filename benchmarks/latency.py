"""Measured latency of pruned models: fxprune's defaults, round_to=8, latency targets, and torch-pruning.

For each model (random weights, eval mode, 2 CPU threads unless --threads) and batch size this builds

* ``ratio=0.5``: ``fxprune.compile(model, ratio=0.5)`` with the default settings (round_to="auto");
* ``ratio=0.5, round_to=8``;
* ``ratio=0.5, SELECTOR`` for each of --selectors (e.g. ``latency_per_flop``);
* ``speedup=S`` for each S of --speedups: ``fxprune.compile(model, speedup=S)``;
* ``torch-pruning``: ``MetaPruner`` with L1 importance, ``round_to=8`` (its recommendation), the final
  classifier ignored, at the per-layer ratio (found by bisection) that gives the FLOPs of the
  ``ratio=0.5`` row, within 1%;
* ``torch-pruning's FLOPs``: ``fxprune.compile(model, target_gflops=...)`` with the default settings at
  exactly the FLOPs of the torch-pruning row, so that the two compare at equal FLOPs;

then times the original and every pruned model of a model and batch size in turns (one timing of each
per round, --repeat rounds, ``fxprune.latency.timing.measure_in_turns``), so that all rows of one model are
measured side by side, and prints each row's FLOPs ratio and median-latency ratio to the original, plus
the compile time. Every compile runs with verify=False;
``speedup`` rows also report the speed-up the compile measured itself.

    python benchmarks/latency.py
    python benchmarks/latency.py --models resnet50,mobilenet_v2 --batches 1 --speedups 2,1.5 --json out.json
    python benchmarks/latency.py --batches 1 --speedups "" --no-round-to-8    # defaults against the peer only
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torchvision
from tabulate import tabulate

import fxprune
from fxprune.latency.timing import measure_in_turns
from zoo import classifier

MODELS = ("resnet50,resnet18,mobilenet_v2,mobilenet_v3_large,efficientnet_b0,regnet_y_400mf,convnext_tiny,"
          "densenet121,vgg16_bn,shufflenet_v2_x1_0,squeezenet1_1")


def closest_ratio(prune: Callable[[float], Any], flops_of: Callable[[Any], int], flops: int, tries: int = 12,
                  tolerance: float = 0.01, hi: float = 0.95) -> Any:
    """The result of ``prune(ratio)`` whose ``flops_of`` is closest to ``flops`` (bisection on the ratio,
    stopping within ``tolerance``)."""
    lo, best = 0.0, None
    for _ in range(tries):
        mid = (lo + hi) / 2
        m = prune(mid)
        f = flops_of(m)
        if best is None or abs(f - flops) < abs(best[1] - flops):
            best = (m, f)
        if abs(f - flops) <= tolerance * flops:
            break
        lo, hi = (mid, hi) if f > flops else (lo, mid)
    return best[0]


SELECTORS_HELP = "comma-separated selectors, one ratio=0.5 row each (e.g. latency_per_flop)"


def selector_rows(names: str) -> list[tuple[str, dict[str, Any]]]:
    """The rows of --selectors: ``ratio=0.5`` with each comma-separated selector."""
    return [(f"ratio=0.5, {s}", {"ratio": 0.5, "selector": s}) for s in names.split(",") if s]


def tp_at(model: torch.nn.Module, x: torch.Tensor, flops: int) -> torch.nn.Module:
    """torch-pruning's result at the per-layer ratio whose FLOPs match ``flops`` (bisection)."""
    import torch_pruning as tp

    def prune(p: float) -> torch.nn.Module:
        m = copy.deepcopy(model)
        tp.pruner.MetaPruner(m, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=p,
                             round_to=8, ignored_layers=[classifier(m)]).step()
        return m

    return closest_ratio(prune, lambda m: fxprune.count_flops(m, x), flops)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--speedups", default="2", help="comma-separated speed-up targets, one row each")
    ap.add_argument("--repeat", type=int, default=21, help="timing rounds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--selectors", default="", help=SELECTORS_HELP)
    ap.add_argument("--no-tp", action="store_true", help="skip torch-pruning")
    ap.add_argument("--no-round-to-8", action="store_true", help="skip the ratio=0.5, round_to=8 row")
    ap.add_argument("--json", help="also write the rows as JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module="torch_pruning")
    speedups = [float(s) for s in args.speedups.split(",") if s]
    rows, records = [], []
    for name in args.models.split(","):
        model = torchvision.models.get_model(name, weights=None).eval()
        tp_model = None
        for batch in (int(b) for b in args.batches.split(",")):
            x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
            base = fxprune.count_flops(model, x)
            variants = {}
            rows_wanted = [("ratio=0.5", {"ratio": 0.5}), ("ratio=0.5, round_to=8", {"ratio": 0.5, "round_to": 8}),
                           *selector_rows(args.selectors),
                           *[(f"speedup={s:g}", {"speedup": s}) for s in speedups]]

            def build(label: str, kw: dict) -> None:
                t = time.perf_counter()
                try:
                    pruned = fxprune.compile(model, example_inputs=x, verify=False, **kw)
                except (fxprune.TargetUnreachableError, fxprune.MeasurementError) as exc:
                    print(f"{name} batch {batch} {label}: {str(exc).splitlines()[0]}", flush=True)
                    return
                measured = pruned.meta["fxprune"]["report"].get("latency")
                own = (measured["speedup"], measured["estimated_speedup"]) if measured else None
                variants[label] = (pruned, time.perf_counter() - t, own)

            for label, kw in rows_wanted:
                if not (args.no_round_to_8 and "round_to" in kw):
                    build(label, kw)
            if not args.no_tp and tp_model != "failed":
                if tp_model is None:
                    t = time.perf_counter()
                    try:
                        tp_model = tp_at(model, x[:1], fxprune.count_flops(variants["ratio=0.5"][0], x[:1]))
                    except Exception as exc:  # noqa: BLE001 - the peer's failure is a result too
                        print(f"{name}: torch-pruning failed: {type(exc).__name__}: {exc}", flush=True)
                        tp_model = "failed"
                    tp_seconds = time.perf_counter() - t
                if tp_model != "failed":
                    variants["torch-pruning, round_to=8"] = (tp_model, tp_seconds, None)
                    build("torch-pruning's FLOPs", {"target_gflops": fxprune.count_flops(tp_model, x) / 1e9})
            timed = measure_in_turns([model, *(v[0] for v in variants.values())], (x,), repeat=args.repeat)
            original = timed[0]
            for (label, (pruned, seconds, self_speedup)), lat in zip(variants.items(), timed[1:]):
                rec = {"model": name, "batch": batch, "row": label, "flops_ratio": fxprune.count_flops(pruned, x) / base,
                       "latency_ratio": lat.median_ms / original.median_ms, "original_ms": original.median_ms,
                       "pruned_ms": lat.median_ms, "compile_s": seconds, "compile_measured_speedup": self_speedup and self_speedup[0],
                       "compile_estimated_speedup": self_speedup and self_speedup[1]}
                records.append(rec)
                rows.append([name, batch, label, f"{rec['flops_ratio']:.3f}", f"{rec['latency_ratio']:.3f}",
                             f"{1 / rec['latency_ratio']:.2f}x", f"{original.median_ms:.1f}", f"{lat.median_ms:.1f}",
                             f"{seconds:.1f}", "-" if self_speedup is None else f"{self_speedup[0]:.2f}x (est. {self_speedup[1]:.2f}x)"])
                print(tabulate([rows[-1]], tablefmt="plain"), flush=True)
    headers = ["model", "batch", "row", "FLOPs ratio", "latency ratio", "speed-up", "original ms", "pruned ms",
               "compile s", "compile's own measure (latency model's estimate)"]
    print()
    print(tabulate(rows, headers=headers, tablefmt="github"))
    by_row: dict[str, list[float]] = {}
    for r in records:
        by_row.setdefault(f"{r['row']} (batch {r['batch']})", []).append(r["latency_ratio"])
    print()
    print(tabulate([[k, f"{statistics.median(v):.3f}", f"{max(v):.3f}", len(v)] for k, v in by_row.items()],
                   headers=["row", "median latency ratio", "worst", "models"], tablefmt="github"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "repeat": args.repeat, "rows": records}, f, indent=1)


if __name__ == "__main__":
    main()
