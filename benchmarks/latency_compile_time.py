"""How long does a latency target take to compile, with an empty and with a warm timing cache?

In one process, one call after the other, on a new cache folder (``FXPRUNE_CACHE_DIR`` is pointed at a
fresh temporary directory): ``compile(model, speedup=S)`` (empty cache), the same call twice more (every
timing cached), and ``compile(model, ratio=0.5)`` twice, for comparison. Prints seconds, the speed-up
the compile measured, and how many timings each call took.

    python benchmarks/latency_compile_time.py
    python benchmarks/latency_compile_time.py --model mobilenet_v2 --speedup 1.5 --batch 8
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torchvision
from tabulate import tabulate

import fxprune


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--speedup", type=float, default=2.0)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["FXPRUNE_CACHE_DIR"] = tempfile.mkdtemp(prefix="fxprune-cache-")
    model = torchvision.models.get_model(args.model, weights=None).eval()
    x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    calls = [("speedup, empty cache", {"speedup": args.speedup}), ("speedup again", {"speedup": args.speedup}),
             ("ratio=0.5", {"ratio": 0.5}), ("speedup once more", {"speedup": args.speedup}), ("ratio=0.5 again", {"ratio": 0.5})]
    rows = []
    for label, kw in calls:
        start = time.perf_counter()
        pruned = fxprune.compile(model, example_inputs=x, **kw)
        seconds = time.perf_counter() - start
        lat = fxprune.report(pruned).latency or {}
        rows.append([label, f"{seconds:.2f}", f"{lat['speedup']:.2f}x" if lat else "-", lat.get("timings_taken", "-"),
                     lat.get("results_timed", "-")])
        print(tabulate([rows[-1]], tablefmt="plain"), flush=True)
    print(tabulate(rows, headers=["call", "seconds", "measured speed-up", "timings taken", "results timed"], tablefmt="github"))


if __name__ == "__main__":
    main()
