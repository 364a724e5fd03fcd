"""Accuracy at equal measured latency: fxprune's selectors side by side with torch-pruning, on real data.

torchvision's ``resnet18`` and ``mobilenet_v2`` (``num_classes=10``, ``weights=None``) are trained from
scratch on Fashion-MNIST, resized to 3x64x64 (bilinear, the grey channel repeated) so that a batch-1
forward is more than per-operator overhead. Each is then pruned to run 1.5x and 2x faster on
this machine by every method (MobileNetV2 at batch 32: at small batches its per-operator overhead is most
of its time here; at batch 8 a MobileNetV2 of half its width ran only 1.44-1.66x faster than the original,
and 2x meant removing 97% of the FLOPs), and every result is fine-tuned with the same budget (the same images in
the same order, the same optimizer and steps):

* ``default``: ``fxprune.compile(model, speedup=s, calibration=..., loss_fn=...)`` as shipped for a user
  with data (a row of its own only when its selector, ``fxprune.api.LATENCY_WITH_DATA``, is not one of
  the rows below);
* ``bn_taylor`` (importance: |gamma x dL/dgamma| from one pass over 1,024 held-out training images, every
  group losing the same share), ``knapsack_bn_taylor`` (the same importance, allocated by the knapsack),
  ``latency_per_flop``, ``knapsack`` (importance: l1 of the weights), ``uniform`` and ``l1``:
  ``speedup=s`` with that selector;
* ``knapsack:NAME`` (ablations, not in the default list): the knapsack with selector NAME's scores as
  importance, e.g. ``knapsack:bn_scale``, or ``knapsack:equal`` (every channel equally important:
  allocation by cost alone);
* ``torch-pruning``: ``MetaPruner`` with L1 group importance, ``round_to=8``, the classifier ignored; it
  has no latency target, so its per-layer ratio is bisected until its measured speed-up is within 3% of s.

Reported per result: test accuracy before and after fine-tuning, the speed-up measured at the end with
all of a model's results and the original taking turns (medians, ``--latency-rounds`` rounds), MFLOPs and
parameters. Every method's accuracy right after pruning separates what it chose (importance and
allocation) from what fine-tuning recovers.

Data: Debian's ``dataset-fashion-mnist`` package (``sudo apt-get install dataset-fashion-mnist``, or
``--install-data``, which runs that when the script is root and the files are missing).

    python benchmarks/accuracy_latency.py --out docs              # the full run (docs/results.md), under 60 minutes here
    python benchmarks/accuracy_latency.py --quick --out /tmp/al   # a few minutes, to check the script
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from tabulate import tabulate
from torch import nn

import fxprune
from fxprune.api import LATENCY_WITH_DATA
from fxprune.latency.timing import compare, measure_in_turns
from fxprune.selection.knapsack import Knapsack
from fxprune.selection.selectors import data_driven, get_selector
from latency import closest_ratio
from reproduce import fashion_mnist
from zoo import classifier

SIZE = 64
SELECTORS = ("bn_taylor", "knapsack_bn_taylor", "latency_per_flop", "knapsack", "uniform", "l1")
TOLERANCE = 0.03


@dataclass
class Row:
    model: str
    batch: int
    speedup: float
    method: str
    pruned_acc: float
    acc: float
    measured: float
    latency_ms: float
    mflops: float
    params: int
    seconds: float


class Images:
    """Fashion-MNIST as the models see it: 3 x ``SIZE`` x ``SIZE``, resized batch by batch."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def batch(self, idx: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.interpolate(self.x[idx], size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        return x.expand(-1, 3, -1, -1).contiguous(), self.y[idx]


class Trainer:
    """SGD with Nesterov momentum and a cosine schedule over the next ``steps`` batches of one seeded
    order of the training images: every model trained from the same position sees the same images."""

    def __init__(self, data: Images, seed: int, batch: int = 64) -> None:
        self.data, self.batch = data, batch
        self.order = torch.randperm(len(data.x), generator=torch.Generator().manual_seed(seed))

    def __call__(self, model: nn.Module, steps: int, lr: float, start: int) -> None:
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-5, nesterov=True)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.15)
        for k in range(steps):
            at = (start + k * self.batch) % (len(self.order) - self.batch)
            x, y = self.data.batch(self.order[at : at + self.batch])
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
        model.eval()


def accuracy(model: nn.Module, data: Images, images: int) -> float:
    model.eval()
    hits = 0
    with torch.no_grad():
        for i in range(0, images, 250):
            x, y = data.batch(slice(i, min(i + 250, images)))
            hits += int((model(x).argmax(1) == y).sum())
    return 100 * hits / images


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None, num_classes=10)


def baseline(name: str, train: Trainer, steps: int, work: Path, seed: int) -> nn.Module:
    """``name`` trained from scratch for ``steps`` batches (kept in ``work`` for later runs of the same setting)."""
    path = work / f"{name}-s{seed}-{steps}x{train.batch}-{SIZE}px.pt"
    model = build(name)
    if path.exists():
        model.load_state_dict(torch.load(path))
    else:
        train(model, steps, lr=0.1, start=0)
        work.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model.eval()


def torch_pruning_at(model: nn.Module, x: torch.Tensor, speedup: float, rounds: int) -> nn.Module:
    """torch-pruning's result at the per-layer ratio whose measured speed-up is within 3% of ``speedup``."""
    import torch_pruning as tp

    def prune(p: float) -> nn.Module:
        m = copy.deepcopy(model)
        tp.pruner.MetaPruner(m, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=p,
                             round_to=8, ignored_layers=[classifier(m)]).step()
        return m.eval()

    return closest_ratio(prune, lambda m: compare(model, m, (x,), rounds=rounds).ratio, 1 / speedup, tolerance=TOLERANCE)


class Equal:
    """Every channel equally important: the knapsack then allocates by cost alone."""

    def scores(self, graph: Any, gm: nn.Module) -> dict[int, torch.Tensor]:
        return {g.id: torch.ones(g.width) for g in graph.prunable_groups}


def options(method: str, calib: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    """``compile``'s keywords for ``method``: a selector's name, ``default``, or ``knapsack:NAME``, the
    knapsack with selector NAME's scores as importance (for the ablations)."""
    data = {"calibration": calib, "loss_fn": F.cross_entropy}
    if method == "default":
        return data
    name, _, importance = method.partition(":")
    if importance == "equal":
        return {"selector": Knapsack(Equal())}
    if importance:
        reads = importance in data_driven()
        return {"selector": Knapsack(get_selector(importance, **(data if reads else {})))}
    return {"selector": name, **(data if name in data_driven() else {})}


def prune_all(name: str, model: nn.Module, x: torch.Tensor, speedup: float, methods: list[str], calib: list[tuple[torch.Tensor, torch.Tensor]],
              rounds: int) -> dict[str, tuple[nn.Module, float]]:
    """Every method's pruned copy of ``model`` at ``speedup`` on input ``x`` and the seconds it took (none
    for a method whose target is out of reach)."""
    out = {}
    for method in methods:
        t = time.perf_counter()
        if method == "torch-pruning":
            pruned = torch_pruning_at(model, x, speedup, rounds)
        else:
            try:
                pruned = fxprune.compile(model, example_inputs=(x,), speedup=speedup, on_noise="warn", **options(method, calib))
            except fxprune.TargetUnreachableError as exc:
                print(f"  {name} {speedup}x {method}: out of reach, best measured {exc.best_speedup:.2f}x", flush=True)
                continue
        out[method] = (pruned, time.perf_counter() - t)
        print(f"  {name} {speedup}x {method}: pruned in {out[method][1]:.0f} s", flush=True)
    return out


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r.model for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.5), squeeze=False)
    methods = list(dict.fromkeys(r.method for r in rows if r.method != "original"))
    for ax, name in zip(axes[0], names):
        own = [r for r in rows if r.model == name]
        for i, method in enumerate(methods):
            pts = sorted((r.measured, r.acc) for r in own if r.method == method)
            if pts:
                ax.plot(*zip(*pts), marker="os^vDPX*"[i % 8], linestyle="-", label=method)
        base = next(r for r in own if r.method == "original")
        ax.axhline(base.acc, color="grey", linestyle=":", label="original")
        ax.set(title=f"{name}, Fashion-MNIST 3x{SIZE}x{SIZE}, batch {own[0].batch}, CPU", xlabel="measured speed-up (x, higher is faster)",
               ylabel="test accuracy % after fine-tuning")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet18,mobilenet_v2")
    ap.add_argument("--speedups", default="1.5,2")
    ap.add_argument("--methods", default=",".join(("default", *SELECTORS, "torch-pruning")))
    ap.add_argument("--batches", default="resnet18=1,mobilenet_v2=32", help="the batch size latency is measured at, per model")
    ap.add_argument("--train-steps", default="resnet18=260,mobilenet_v2=420", help="baseline training batches of 64, per model")
    ap.add_argument("--finetune-steps", type=int, default=60, help="fine-tuning batches of 64 after pruning, the same for every method")
    ap.add_argument("--test-images", type=int, default=5000)
    ap.add_argument("--latency-rounds", type=int, default=21)
    ap.add_argument("--seed", type=int, default=0, help="the order of the training images")
    ap.add_argument("--data", default="/tmp/fxprune-data")
    ap.add_argument("--work", default="/tmp/fxprune-accuracy-latency", help="where trained baselines are kept")
    ap.add_argument("--install-data", action="store_true", help="apt-get install dataset-fashion-mnist when missing (as root)")
    ap.add_argument("--quick", action="store_true", help="a smoke test: few steps, few images")
    ap.add_argument("--out", default="docs")
    args = ap.parse_args()
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore", module="torch_pruning")
    if args.quick:
        args.train_steps, args.finetune_steps, args.test_images, args.latency_rounds = "resnet18=10,mobilenet_v2=10", 4, 500, 7
    train_steps, batches = (dict((k, int(v)) for k, v in (kv.split("=") for kv in text.split(","))) for text in (args.train_steps, args.batches))
    xtr, ytr, xte, yte = fashion_mnist(Path(args.data), args.install_data)
    train, test = Trainer(Images(xtr[:-1024], ytr[:-1024]), args.seed), Images(xte, yte)
    held = Images(xtr[-1024:], ytr[-1024:])
    calib = [held.batch(slice(i, i + 128)) for i in range(0, 1024, 128)]
    methods = args.methods.split(",")
    wanted = [m for m in methods if not (m == "default" and LATENCY_WITH_DATA in methods)]  # the default once
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    t_all = time.perf_counter()
    for name in args.models.split(","):
        x1 = torch.randn(batches[name], 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
        t = time.perf_counter()
        model = baseline(name, train, train_steps[name], Path(args.work), args.seed)
        print(f"{name}: baseline {accuracy(model, test, args.test_images):.2f}% ({time.perf_counter() - t:.0f} s)", flush=True)
        results: list[tuple[float, str, nn.Module, float, float]] = []
        for s in (float(v) for v in args.speedups.split(",")):
            for method, (pruned, seconds) in prune_all(name, model, x1, s, wanted, calib, args.latency_rounds).items():
                before = accuracy(pruned, test, min(1000, args.test_images))
                train(pruned, args.finetune_steps, lr=0.01, start=train_steps[name] * train.batch)
                results.append((s, f"default ({LATENCY_WITH_DATA})" if method == "default" else method, pruned, before, seconds))
        lat = measure_in_turns([model] + [r[2] for r in results], (x1,), repeat=args.latency_rounds)
        base = Row(name, batches[name], 1.0, "original", accuracy(model, test, min(1000, args.test_images)), accuracy(model, test, args.test_images),
                   1.0, lat[0].median_ms, fxprune.count_flops(model, x1) / 1e6, sum(p.numel() for p in model.parameters()), 0.0)
        rows.append(base)
        print(f"{name}: pruned, fine-tuned and timed in {time.perf_counter() - t:.0f} s", flush=True)
        for (s, method, pruned, before, seconds), took in zip(results, lat[1:], strict=True):
            rows.append(Row(name, batches[name], s, method, before, accuracy(pruned, test, args.test_images), lat[0].median_ms / took.median_ms, took.median_ms,
                            fxprune.count_flops(pruned, x1) / 1e6, sum(p.numel() for p in pruned.parameters()), seconds))
        (out / "accuracy_latency.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    headers = ["model", "batch", "target", "method", "acc % pruned", "acc % fine-tuned", "speed-up measured", "ms", "MFLOPs", "params", "prune s"]
    table = tabulate([[r.model, r.batch, "-" if r.method == "original" else f"{r.speedup:g}x", r.method, f"{r.pruned_acc:.2f}", f"{r.acc:.2f}",
                       f"{r.measured:.2f}x", f"{r.latency_ms:.2f}", f"{r.mflops:.1f}", f"{r.params / 1e6:.2f}M", f"{r.seconds:.0f}"] for r in rows],
                     headers, tablefmt="github")
    print(table)
    (out / "accuracy_latency.md").write_text(table + "\n")
    plot(rows, out / "accuracy_latency.png")
    print(f"total {time.perf_counter() - t_all:.0f} s; default selector with data: {LATENCY_WITH_DATA}, without: {fxprune.Strategy().selector}")


if __name__ == "__main__":
    main()
