"""Compile time: fxprune vs torch-pruning, side by side in one process.

For each model (random weights, eval mode, one 1x3x224x224 input, 2 CPU threads) this times, after one
warm-up run of each, the median of --repeat runs of

* fxprune: ``fxprune.compile(model, ratio=0.5, example_inputs=x, verify=False)``;
* torch-pruning: ``MetaPruner`` construction (builds the ``tp.DependencyGraph``) + one ``step()`` at
  ``pruning_ratio=0.5`` with L1 magnitude importance, final classifier ignored, on a fresh deep copy
  of the model per run (the copy is not timed). A call that runs longer than --tp-timeout seconds is
  stopped with SIGALRM and the model's remaining torch-pruning runs are skipped.

It also prints the number of torch.fx graph nodes and fxprune's time per 1000 nodes, to judge whether
fxprune scales linearly with graph size, the torch-pruning / fxprune time ratio, and fxprune's compile
time in eager forward passes of the same model on the same input (``torch.no_grad``), timed interleaved
with the compiles (compile, capture alone, forward, compile ...; medians of each; a full garbage collection,
untimed, after each, so that no step frees what the one before discarded), in all and beyond the capture
(compile minus capture, over one forward).

--stages adds fxprune's time in each pass of its compiles (medians, ms); --load runs everything while two
processes load the CPU (``noisy_latency.py``'s loads: ``torch``, 2-thread matmuls in random bursts).

    python benchmarks/compile_time.py
    python benchmarks/compile_time.py --models resnet50,swin_t --repeat 3 --tp-timeout 60
    python benchmarks/compile_time.py --no-tp --repeat 5 --models mobilenet_v2 --stages --load torch
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import gc
import signal
import statistics
import sys
import time

import torch
import torch.fx
import torchvision
from tabulate import tabulate

import fxprune
import fxprune.pipeline
from fxprune.passes.capture import capture
from noisy_latency import LOADS, Load
from zoo import build_model, short_error, tp_prune

DEFAULT_MODELS = "resnet50,densenet201,mobilenet_v2,efficientnet_b0,swin_t,maxvit_t,convnext_tiny,regnet_y_400mf"


class Timeout(BaseException):  # not Exception, so library code cannot swallow it
    pass


def _alarm(signum, frame):
    raise Timeout


STAGES = {"capture": "capture", "propagate_shapes": "shapes", "couple": "couple", "select": "select", "rewrite": "rewrite",
          "annotate": "report"}
"""The passes ``fxprune.pipeline`` calls during a compile, and their columns in --stages."""

stage_seconds: dict[str, float] = collections.defaultdict(float)  # of the compile running now


@contextlib.contextmanager
def timing_stages():
    """Each pass in ``STAGES`` adds its seconds to ``stage_seconds`` while the block runs."""
    def timed(name, fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                stage_seconds[name] += time.perf_counter() - start
        return run

    originals = {name: getattr(fxprune.pipeline, name) for name in STAGES}
    for name, fn in originals.items():
        setattr(fxprune.pipeline, name, timed(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(fxprune.pipeline, name, fn)


def fx_seconds(model, x) -> float:
    start = time.perf_counter()
    fxprune.compile(model, ratio=0.5, example_inputs=x, verify=False)
    return time.perf_counter() - start


def forward_seconds(model, x) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        model(x)
        return time.perf_counter() - start


def capture_seconds(model, x) -> float:
    start = time.perf_counter()
    capture(model, (x,))
    return time.perf_counter() - start


def fx_and_forward(model, x, repeat: int) -> tuple[tuple[float, float, float], dict[str, float]] | str:
    """Medians of fxprune compiles, captures alone and eager forwards, taking turns, after one warm-up of
    each; and the median seconds of each pass of the compiles."""
    stages = collections.defaultdict(list)

    def compile_seconds() -> float:
        stage_seconds.clear()
        with timing_stages():
            seconds = fx_seconds(model, x)
        for name in STAGES:
            stages[name].append(stage_seconds[name])
        return seconds

    def collected(seconds: float) -> float:
        gc.collect()  # what the step discarded is freed here, untimed, not inside the next step's timing
        return seconds

    try:
        fx_seconds(model, x), capture_seconds(model, x), forward_seconds(model, x)
        runs = [(collected(compile_seconds()), collected(capture_seconds(model, x)), collected(forward_seconds(model, x)))
                for _ in range(repeat)]
    except Exception as exc:
        return short_error(exc, 40)
    return tuple(statistics.median(r[k] for r in runs) for k in range(3)), {k: statistics.median(v) for k, v in stages.items()}


def tp_seconds(model, x, timeout: int) -> float:
    model = copy.deepcopy(model)
    signal.alarm(timeout)
    try:
        start = time.perf_counter()
        tp_prune(model, x)
        return time.perf_counter() - start
    finally:
        signal.alarm(0)


def median_seconds(measure, repeat: int) -> float | str:
    """Warm up once, then the median of ``repeat`` runs; the short error or timeout on failure."""
    try:
        measure()
        return statistics.median(measure() for _ in range(repeat))
    except Timeout:
        return "timeout"
    except Exception as exc:
        return short_error(exc, 40)


def graph_nodes(model) -> int | str:
    try:
        return len(list(torch.fx.symbolic_trace(model).graph.nodes))
    except Exception:
        return "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated torchvision model names, or 'all' (every classifier)")
    parser.add_argument("--no-tp", action="store_true", help="skip torch-pruning")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per tool (default 5)")
    parser.add_argument("--tp-timeout", type=int, default=120, help="seconds per torch-pruning call (default 120)")
    parser.add_argument("--stages", action="store_true", help="add fxprune's milliseconds in each pass")
    parser.add_argument("--load", choices=sorted(LOADS), default=None, help="run while two processes load the CPU")
    args = parser.parse_args()
    with Load(args.load, 2, 0) if args.load else contextlib.nullcontext():
        table(args)


def table(args: argparse.Namespace) -> None:

    torch.set_num_threads(2)
    signal.signal(signal.SIGALRM, _alarm)
    rows = []
    names = torchvision.models.list_models(module=torchvision.models) if args.models == "all" else args.models.split(",")
    start = time.perf_counter()
    for i, name in enumerate(names, 1):
        model = build_model(name)
        x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        nodes = graph_nodes(model)
        gc.collect()  # the models before left their results as reference cycles: free them before these timings, not in them
        timed = fx_and_forward(model, x, args.repeat)
        (fx, cap, fwd), stages = timed if isinstance(timed, tuple) else ((timed, None, None), {})
        tp = "skipped" if args.no_tp else median_seconds(lambda: tp_seconds(model, x, args.tp_timeout), args.repeat)
        if tp == "timeout":
            tp = f"timeout >{args.tp_timeout}s"
        fx_ok, tp_ok = isinstance(fx, float), isinstance(tp, float)
        rows.append([
            name, nodes,
            f"{fx:.2f}" if fx_ok else fx,
            f"{1000 * fx / nodes:.2f}" if fx_ok and isinstance(nodes, int) else "-",
            f"{fx / fwd:.1f}" if fx_ok else "-",
            f"{(fx - cap) / fwd:.1f}" if fx_ok else "-",
            f"{tp:.2f}" if tp_ok else tp,
            f"{tp / fx:.1f}x" if fx_ok and tp_ok else "-",
            *([f"{1000 * stages[k]:.1f}" if stages else "-" for k in STAGES] if args.stages else []),
        ])
        print(f"[{i}/{len(names)}, {time.perf_counter() - start:.0f} s] {name}: fxprune {rows[-1][2]} s, "
              f"{rows[-1][4]} forward passes, {rows[-1][5]} beyond capture", file=sys.stderr, flush=True)
    headers = ["model", "fx nodes", "fxprune s", "fxprune s / 1k nodes", "forward passes", "beyond capture", "torch-pruning s", "tp / fxprune"]
    headers += [f"{column} ms" for column in STAGES.values()] if args.stages else []
    print(tabulate(rows, headers=headers, disable_numparse=True))
    load = f"; under the {args.load} load (2 processes)" if args.load else ""
    print(f"median of {args.repeat} runs after one warm-up; torch.get_num_threads() = {torch.get_num_threads()}{load}")


if __name__ == "__main__":
    main()
