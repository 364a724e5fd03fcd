"""How long does fxprune take to start: ``import fxprune`` in a process that has imported torch, and
``fxprune --help`` in all (a fresh interpreter each time), quiet and while two processes load the CPU
(``noisy_latency.py``'s ``torch`` load: 2-thread matmuls in random bursts)?

With ``--base DIR`` (a checkout of another commit, say from ``git worktree add``), that code is timed in
turns with this one and the table gives the ratio of the medians; each run checks which copy it imported.

    python benchmarks/startup.py
    git worktree add /tmp/base <commit> && python benchmarks/startup.py --base /tmp/base
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

from noisy_latency import Load

ROOT = Path(__file__).resolve().parents[1]
IMPORT = ("import sys, time, torch; t = time.perf_counter(); import fxprune; took = time.perf_counter() - t; "
          "assert fxprune.__file__.startswith(sys.argv[1]), fxprune.__file__; print(took)")
HELP = ("import sys, fxprune; assert fxprune.__file__.startswith(sys.argv[1]), fxprune.__file__; "
        "from fxprune.cli import main; main(['--help'])")


def seconds(code: str, root: str, printed: bool) -> float:
    """One fresh interpreter running ``code`` on the fxprune of ``root`` (away from this checkout, so that
    the working directory does not decide which copy is imported): what ``code`` prints, or its wall time."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, root], env={**os.environ, "PYTHONPATH": root}, cwd="/",
                          capture_output=True, text=True, check=True)
    return float(done.stdout) if printed else time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", help="a checkout of another commit to time in turns with this one")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    roots = {"this": str(ROOT)} | ({"base": str(Path(args.base).resolve())} if args.base else {})
    rows = []
    for load in ("quiet", "torch"):
        with Load("torch", 2, 0) if load == "torch" else contextlib.nullcontext():
            time.sleep(2 if load == "torch" else 0)  # the loading processes start their matmuls
            for what, code, printed in (("import fxprune after torch", IMPORT, True), ("fxprune --help", HELP, False)):
                taken: dict[str, list[float]] = {name: [] for name in roots}
                for _ in range(args.repeat):
                    for name, root in roots.items():
                        taken[name].append(seconds(code, root, printed))
                med = {name: statistics.median(v) for name, v in taken.items()}
                rows.append([load, what, *(f"{med[n]:.2f} ({min(v):.2f}-{max(v):.2f})" for n, v in taken.items()),
                             *([f"{med['this'] / med['base']:.2f}"] if args.base else [])])
    print(tabulate(rows, headers=["load", "what", *(f"{n} s, median (range)" for n in roots), *(["this / base"] if args.base else [])],
                   tablefmt="github"))
    print(f"medians of {args.repeat} fresh interpreters in turns; torch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
