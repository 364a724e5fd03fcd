"""Memory of repeated compiles: the process's resident set while one model is compiled again and again.

Runs ``fxprune.compile(model, ratio=0.5, example_inputs=x, verify=False)`` --compiles times in a loop at
batch 1, 224x224, discarding each result as a user's sweep does, and prints the resident set size
(``/proc/self/statm``) every --every compiles. A result is a graph of reference cycles that only Python's
cyclic collector frees, so the resident set must level off; one that grows with every compile means results
wait for collections that do not come (a garbage-collection pause around the passes did that: 2.89 GB after
40 compiles of ResNet-50 against a 1.16 GB plateau, docs/benchmarks.md). Linux only.

    python benchmarks/compile_memory.py
    python benchmarks/compile_memory.py --model mobilenet_v2 --compiles 100 --every 10
"""

from __future__ import annotations

import argparse
import os

import torch
import torchvision
from tabulate import tabulate

import fxprune


def resident_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50", help="torchvision model name (default resnet50)")
    parser.add_argument("--compiles", type=int, default=40, help="compiles in the loop (default 40)")
    parser.add_argument("--every", type=int, default=5, help="print the resident set every this many compiles (default 5)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = torchvision.models.get_model(args.model, weights=None).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    rows = [[0, f"{resident_gb():.2f}"]]
    for i in range(1, args.compiles + 1):
        fxprune.compile(model, ratio=0.5, example_inputs=x, verify=False)
        if i % args.every == 0:
            rows.append([i, f"{resident_gb():.2f}"])
    print(tabulate(rows, headers=[f"{args.model} compiles", "resident GB"], disable_numparse=True))


if __name__ == "__main__":
    main()
