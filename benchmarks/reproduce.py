"""Do the research claims hold? Gradual pruning of small CNNs on Fashion-MNIST with every selector.

Three small CNNs (VGG-style, ResNet-style, SqueezeNet-style with fire modules) are trained to a
baseline, then each selector prunes each of them with ``fxprune.prune_iteratively`` in equal FLOPs
steps to 75% FLOPs reduction; the model after the step that reaches 50% is the 50% result. Every run
has the same fine-tuning budget per step (same images, same optimizer, same seed). Reported per result:
test accuracy (all 10,000 test images), GFLOPs, parameters, CPU latency at batch 1 and 32, total pruning
time and the part of it spent ranking. Latency is measured at the end, all models taking turns for
``--latency-rounds`` rounds of ``--latency-runs`` timed forwards after 2 warm-up forwards; the median
over all of a model's timed forwards is reported. A shared host's speed drifts over a long run; taking
turns makes the drift slow every model alike instead of whichever ran last.

Data: Debian's ``dataset-fashion-mnist`` package (``apt-get install dataset-fashion-mnist``, or
``--install-data``, which runs that when the script is root and the files are missing) ships the four idx
files, which are uncompressed into ``<data>/FashionMNIST/raw/`` for
``torchvision.datasets.FashionMNIST(download=False)``.

    python benchmarks/reproduce.py --out docs            # the full run (see docs/results.md)
    python benchmarks/reproduce.py --quick --out /tmp/r  # a few minutes, to check the script
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import os
import shutil
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn

import fxprune

PACKAGE_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
MEAN, STD = 0.2860, 0.3530


def fashion_mnist(root: Path, install: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalized train and test images (N, 1, 28, 28) and labels, from the Debian package's files;
    ``install``: run ``apt-get install dataset-fashion-mnist`` when they are missing (as root)."""
    import torchvision

    raw = root / "FashionMNIST" / "raw"
    if not all((raw / f.removesuffix(".gz")).exists() for f in FILES):
        if not all((PACKAGE_DIR / f).exists() for f in FILES):
            if install and os.geteuid() == 0 and shutil.which("apt-get"):
                subprocess.run(["apt-get", "install", "-y", "dataset-fashion-mnist"], check=True)
            else:
                raise SystemExit("Fashion-MNIST is missing: run `sudo apt-get install dataset-fashion-mnist` first, "
                                 "or pass --install-data as root")
        listed = subprocess.run(["dpkg", "-L", "dataset-fashion-mnist"], capture_output=True, text=True, check=True).stdout.split()
        raw.mkdir(parents=True, exist_ok=True)
        for f in FILES:  # torchvision reads the uncompressed files when it may not download
            with gzip.open(next(p for p in listed if p.endswith("/" + f))) as src, open(raw / f.removesuffix(".gz"), "wb") as dst:
                shutil.copyfileobj(src, dst)
    out = []
    for train in (True, False):
        ds = torchvision.datasets.FashionMNIST(str(root), train=train, download=False)
        out += [((ds.data.float() / 255 - MEAN) / STD).unsqueeze(1), ds.targets.clone()]
    return out[0], out[1], out[2], out[3]


def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class VGG(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(1, 16), nn.MaxPool2d(2), conv_bn(16, 32), conv_bn(32, 32), nn.MaxPool2d(2),
            conv_bn(32, 64), conv_bn(64, 64), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 3 * 3, 64), nn.ReLU(inplace=True), nn.Dropout(0.2), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = conv_bn(cin, cout, stride), nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.short = nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(self.conv1(x)) + self.short(x))


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(1, 24), nn.MaxPool2d(2))
        self.layers = nn.Sequential(Block(24, 24, 1), Block(24, 48, 2), Block(48, 48, 1))
        self.fc = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1))


class Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze = nn.Sequential(nn.Conv2d(cin, squeeze, 1, bias=False), nn.BatchNorm2d(squeeze), nn.ReLU(inplace=True))
        self.e1 = nn.Sequential(nn.Conv2d(squeeze, expand, 1, bias=False), nn.BatchNorm2d(expand), nn.ReLU(inplace=True))
        self.e3 = conv_bn(squeeze, expand)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.squeeze(x)
        return torch.cat([self.e1(s), self.e3(s)], 1)


class SqueezeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(1, 32), nn.MaxPool2d(2),
            Fire(32, 8, 32), Fire(64, 8, 32), nn.MaxPool2d(2), Fire(64, 16, 64), Fire(128, 16, 64),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Conv2d(128, 10, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


ARCHS = {"vgg": VGG, "resnet": ResNet, "squeezenet": SqueezeNet}

# name -> prune_iteratively options; random runs with two seeds. gflops_aware and latency_aware rank
# nothing: groups shrink at a capped rate proportional to the MACs (the measured milliseconds) that one
# of their channels saves; bn_taylor (coarse) ranks by |gamma * dL/dgamma| read from fine-tuning's own
# gradients; latency_per_flop takes greedy steps of the groups that save the most estimated
# milliseconds per MAC.
RUNS = {
    "random (seed 0)": {"selector": "random", "seed": 0}, "random (seed 1)": {"selector": "random", "seed": 1},
    "uniform": {"selector": "uniform"}, "l1": {"selector": "l1"},
    "taylor (coarse)": {"selector": "taylor", "coarse": True}, "taylor (separate)": {"selector": "taylor", "coarse": False},
    "bn_taylor (coarse)": {"selector": "bn_taylor", "coarse": True},
    "gflops_aware": {"selector": "gflops_aware"}, "latency_aware": {"selector": "latency_aware"},
    "latency_per_flop": {"selector": "latency_per_flop"},
}


def at_uniform_accuracy(rows: list[Row]) -> list[list[str]]:
    """Each selector's latency at the accuracy that uniform reached at 75%, relative to uniform's latency
    there (batch 1 and 32): interpolated linearly between the selector's 50% and 75% results; "<= r" when
    the selector's 75% result is more accurate than that (its latency there is an upper bound), "-" when
    even its 50% result is less accurate."""
    out = []
    for arch in dict.fromkeys(r.arch for r in rows):
        got = {(r.run, r.reduction): r for r in rows if r.arch == arch}
        if ("uniform", "75%") not in got:
            continue
        u = got[("uniform", "75%")]
        for run in dict.fromkeys(r.run for r in rows if r.arch == arch and r.run not in ("baseline", "uniform")):
            a, b = got[(run, "50%")], got[(run, "75%")]
            cells = []
            for name in ("latency_b1_ms", "latency_b32_ms"):
                if b.accuracy >= u.accuracy:
                    cells.append(f"<= {getattr(b, name) / getattr(u, name):.3f}")
                elif a.accuracy < u.accuracy:
                    cells.append("-")
                else:
                    w = (a.accuracy - u.accuracy) / (a.accuracy - b.accuracy)
                    ms = getattr(a, name) + w * (getattr(b, name) - getattr(a, name))
                    cells.append(f"{ms / getattr(u, name):.3f}")
            out.append([arch, run, f"{100 * u.accuracy:.2f}", *cells])
    return out


class Trainer:
    """SGD over consecutive chunks of the (seeded, shuffled) training set: each call trains on the next
    ``images`` images, so every run sees the same images in the same order at the same step."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, images: int, batch: int, lr: float, seed: int) -> None:
        self.x, self.y, self.images, self.batch, self.lr = x, y, images, batch, lr
        self.order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        self.pos = 0

    def __call__(self, model: nn.Module) -> None:
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
        for _ in range(0, self.images, self.batch):
            if self.pos + self.batch > len(self.order):
                self.pos = 0
            idx = self.order[self.pos:self.pos + self.batch]
            self.pos += self.batch
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(self.x[idx]), self.y[idx]).backward()
            opt.step()


def calibration_set(x: torch.Tensor, y: torch.Tensor, images: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The last ``images`` training images in batches of 128: the data of a separate ranking pass."""
    x, y = x[-images:], y[-images:]
    return [(x[i:i + 128], y[i:i + 128]) for i in range(0, images, 128)]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return sum(int((model(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum()) for i in range(0, len(x), 1000)) / len(x)


def latencies_ms(models: list[nn.Module], batch: int, rounds: int, runs: int) -> list[float]:
    """Median wall time of one eval forward of each model, in ms; the models take turns (see the top)."""
    x = torch.randn(batch, 1, 28, 28)
    times: list[list[float]] = [[] for _ in models]
    with torch.no_grad():
        for _ in range(rounds):
            for model, seen in zip(models, times):
                model.eval()
                for i in range(2 + runs):
                    t = time.perf_counter()
                    model(x)
                    if i >= 2:
                        seen.append(time.perf_counter() - t)
    return [1e3 * statistics.median(seen) for seen in times]


@dataclass
class Row:
    arch: str
    run: str
    reduction: str
    accuracy: float
    gflops: float
    params: int
    pruning_s: float
    ranking_s: float
    latency_b1_ms: float = float("nan")  # filled in at the end, see latencies_ms
    latency_b32_ms: float = float("nan")


def measure(arch: str, run: str, reduction: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, history: fxprune.History | None, upto: int) -> Row:
    steps = history.steps[1:upto + 1] if history else []
    return Row(
        arch, run, reduction, accuracy(model, x, y), fxprune.count_flops(model, x[:1]) / 1e9, sum(p.numel() for p in model.parameters()),
        sum(s.ranking_s + s.selecting_s + s.rewriting_s + s.finetuning_s for s in steps), sum(s.ranking_s for s in steps),
    )


def plot(rows: list[Row], curves: dict[tuple[str, str], list[tuple[float, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(dict.fromkeys(r.arch for r in rows))
    fig, axes = plt.subplots(1, len(archs), figsize=(5.5 * len(archs), 4.2), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        for (a, run), points in curves.items():
            if a == arch:
                ax.plot([1e3 * p[0] for p in points], [100 * p[1] for p in points], marker="o", markersize=3, label=run)
        ax.set_title(f"{arch}: test accuracy along gradual pruning")
        ax.set_xlabel("MFLOPs")  # GFLOPs of these small CNNs need 4 decimals, and their ticks overlap
        ax.set_ylabel("test accuracy (%)")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.savefig(path, bbox_inches="tight", dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path.home() / ".cache" / "fxprune-data")
    p.add_argument("--out", type=Path, default=Path("docs"))
    p.add_argument("--install-data", action="store_true", help="apt-get install dataset-fashion-mnist when missing (as root)")
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--runs", default=",".join(RUNS), help="comma-separated run names (see RUNS)")
    p.add_argument("--baseline-images", type=int, default=120_000, help="training images for the baseline (2 epochs)")
    p.add_argument("--steps", type=int, default=6, help="pruning steps to 75%% reduction; 50%% is reached after 2/3 of them")
    p.add_argument("--finetune-images", type=int, default=6_000, help="fine-tuning images per step")
    p.add_argument("--calibration-images", type=int, default=2_048, help="images of one separate ranking pass")
    p.add_argument("--latency-rounds", type=int, default=10)
    p.add_argument("--latency-runs", type=int, default=3, help="timed forwards per model per round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny budgets, one architecture: checks the script runs")
    args = p.parse_args()
    if args.quick:
        args.archs, args.baseline_images, args.finetune_images, args.calibration_images = "resnet", 2_000, 256, 256
    if args.steps % 3:
        p.error("--steps must be a multiple of 3 (so that one step ends at 50% reduction)")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    xtr, ytr, xte, yte = fashion_mnist(args.data, args.install_data)
    calibration = calibration_set(xtr, ytr, args.calibration_images)
    rows: list[Row] = []
    models: list[nn.Module] = []  # rows[i]'s model
    curves: dict[tuple[str, str], list[tuple[float, float]]] = {}
    start = time.perf_counter()
    for arch in args.archs.split(","):
        torch.manual_seed(0)
        base = ARCHS[arch]()
        t = time.perf_counter()
        Trainer(xtr, ytr, args.baseline_images, 128, 0.05, seed=0)(base)
        base.eval()
        print(f"{arch}: baseline trained in {time.perf_counter() - t:.0f} s", flush=True)
        rows.append(measure(arch, "baseline", "0%", base, xte, yte, None, 0))
        models.append(base)
        print(tabulate([asdict(rows[-1])], headers="keys"), flush=True)
        for run in args.runs.split(","):
            kwargs = dict(RUNS[run])
            if kwargs["selector"] == "taylor":
                kwargs.update(calibration=calibration, loss_fn=F.cross_entropy)
            snapshots: list[nn.Module] = []

            def evaluate(model: nn.Module) -> float:
                snapshots.append(copy.deepcopy(model))
                return accuracy(model, xte, yte)

            pruned, history = fxprune.prune_iteratively(
                base, ratio=0.75, steps=args.steps, example_inputs=xtr[:1],
                finetune=Trainer(xtr, ytr, args.finetune_images, 128, 0.01, seed=1), evaluate=evaluate, progress=False, **kwargs,
            )
            curves[(arch, run)] = [(s.gflops, s.metric) for s in history.steps]
            half = 2 * args.steps // 3
            rows.append(measure(arch, run, "50%", snapshots[half], xte, yte, history, half))
            rows.append(measure(arch, run, "75%", pruned, xte, yte, history, args.steps))
            models += [snapshots[half], pruned]
            print(tabulate([asdict(r) for r in rows[-2:]], headers="keys", floatfmt=".4g"), flush=True)
            print(f"  elapsed {time.perf_counter() - start:.0f} s", flush=True)
    for batch, name in ((1, "latency_b1_ms"), (32, "latency_b32_ms")):
        for row, ms in zip(rows, latencies_ms(models, batch, args.latency_rounds, args.latency_runs)):
            setattr(row, name, ms)
    total = time.perf_counter() - start
    table = tabulate(
        [[r.arch, r.run, r.reduction, f"{100 * r.accuracy:.2f}", f"{r.gflops:.4f}", f"{r.params / 1e3:.1f}K",
          f"{r.latency_b1_ms:.3f}", f"{r.latency_b32_ms:.2f}", f"{r.pruning_s:.1f}", f"{r.ranking_s:.2f}"] for r in rows],
        headers=["model", "selector", "FLOPs cut", "test acc %", "GFLOPs", "params", "latency b1 ms", "latency b32 ms", "pruning s", "ranking s"],
        tablefmt="github",
    )
    same = tabulate(at_uniform_accuracy(rows), headers=["model", "selector", "uniform's 75% acc %", "latency b1 / uniform's", "latency b32 / uniform's"],
                    tablefmt="github")
    table += "\n\nLatency at the accuracy uniform reached at 75% FLOPs cut, relative to uniform's (see at_uniform_accuracy):\n\n" + same
    print(table)
    print(f"total {total:.0f} s")
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "total_s": total, "rows": [asdict(r) for r in rows],
                                                        "curves": {f"{a}|{r}": c for (a, r), c in curves.items()}}, indent=1))
    (args.out / "results_table.md").write_text(table + "\n")
    plot(rows, curves, args.out / "results.png")


if __name__ == "__main__":
    main()
