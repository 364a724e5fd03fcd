"""Does random channel selection match ranking for detection and segmentation? Gradual pruning on
canvases of real Fashion-MNIST images.

Two tasks share one kind of input: a black ``--size`` x ``--size`` canvas with one to four Fashion-MNIST
items, each rescaled to 20-28 pixels and placed (seeded) so that it overlaps the items before it little
(at most ``MAX_IOU`` between their squares). A pixel belongs to an item when its value is above
``THRESHOLD``; a later item covers the earlier ones where its pixels do.
- Detection: each item's box is the tight box around its pixels, its label its class + 1 (0 is the
  background of torchvision's detectors). The model is torchvision's FCOS over a small conv backbone
  (stride 8, one feature map); metric: COCO mAP@[.5:.95] (torchmetrics' MeanAveragePrecision).
- Segmentation: the mask holds each pixel's item class + 1, 0 for background. The model is
  torchvision's FCN over a small conv backbone (stride 4); metric: mIoU over the 11 classes, background
  included (torchmetrics' MulticlassJaccardIndex).

Each model is trained from scratch (seeded), then each selector (random, uniform, l1) prunes a copy with
``fxprune.prune_iteratively`` to half its FLOPs in ``--steps`` equal FLOPs steps, fine-tuning after each
step; every selector sees the same images in the same order. Reported: FLOPs of one whole forward
(``fxprune.count_flops``: the detector's pre- and post-processing included), parameters, the metric on
the test canvases before and after, frames per second at batch 1 (eval mode, no_grad, the trained and
the three pruned models timed in turns, medians) and the wall time of each pruning run (pruning,
fine-tuning and the evaluation after each step).

Torch runs one thread by default (``--threads``): on a 2-core machine that other work shares, two
threads wait on each other whenever one is descheduled, which made a 3 ms forward take 240 ms here.

Data: Debian's ``dataset-fashion-mnist`` package (``sudo apt-get install dataset-fashion-mnist``, or
``--install-data``, which runs that when the script is root and the files are missing); see
``fashion_mnist`` in reproduce.py. Metrics need ``torchmetrics`` and ``pycocotools``.

    python benchmarks/reproduce_detection.py --out /tmp/detection.json   # the full run (docs/results.md)
    python benchmarks/reproduce_detection.py --quick                     # about 2 minutes: checks the script
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from reproduce import MEAN, STD, conv_bn, fashion_mnist
from tabulate import tabulate
from torch import nn
from torchmetrics.classification import MulticlassJaccardIndex
from torchmetrics.detection import MeanAveragePrecision
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.segmentation import FCN
from torchvision.models.segmentation.fcn import FCNHead

import fxprune
from fxprune.latency.timing import measure_in_turns

CLASSES = 11  # background + the 10 Fashion-MNIST classes
THRESHOLD = 0.1  # an item's pixel counts (box, mask) above this value in [0, 1]
MAX_IOU = 0.25  # how much an item's square may overlap an earlier one's
SELECTORS = ["random", "uniform", "l1"]


@dataclass
class Canvases:
    images: torch.Tensor  # (N, 1, S, S), values in [0, 1]
    masks: torch.Tensor  # (N, S, S) int64: class + 1 per pixel, 0 background
    boxes: list[torch.Tensor]  # per canvas (k, 4) float, x1 y1 x2 y2
    labels: list[torch.Tensor]  # per canvas (k,) int64, class + 1


def _iou(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    """IoU of two squares given as (y, x, side)."""
    h = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    w = max(0, min(a[1] + a[2], b[1] + b[2]) - max(a[1], b[1]))
    return h * w / (a[2] ** 2 + b[2] ** 2 - h * w)


def make_canvases(items: torch.Tensor, classes: torch.Tensor, count: int, size: int, seed: int) -> Canvases:
    """``count`` canvases built from ``items`` (N, 28, 28, values in [0, 1]) as the module docstring says;
    an item that finds no place in 20 seeded tries is left out."""
    g = torch.Generator().manual_seed(seed)

    def randint(low: int, high: int) -> int:
        return int(torch.randint(low, high, (1,), generator=g))

    images, masks = torch.zeros(count, 1, size, size), torch.zeros(count, size, size, dtype=torch.int64)
    all_boxes, all_labels = [], []
    for n in range(count):
        placed: list[tuple[int, int, int]] = []
        boxes, labels = [], []
        for _ in range(randint(1, 5)):
            i, side = randint(0, len(items)), randint(20, 29)
            spots = [(randint(0, size - side + 1), randint(0, size - side + 1), side) for _ in range(20)]
            spot = next((s for s in spots if all(_iou(s, p) <= MAX_IOU for p in placed)), None)
            if spot is None:
                continue
            placed.append(spot)
            y, x, _ = spot
            item = F.interpolate(items[i][None, None], size=(side, side), mode="bilinear", antialias=True)[0, 0].clamp(0, 1)
            on = item > THRESHOLD
            ys, xs = on.nonzero(as_tuple=True)
            window = images[n, 0, y:y + side, x:x + side]
            window.copy_(torch.where(on, item, window))
            masks[n, y:y + side, x:x + side][on] = int(classes[i]) + 1
            boxes.append([x + int(xs.min()), y + int(ys.min()), x + int(xs.max()) + 1, y + int(ys.max()) + 1])
            labels.append(int(classes[i]) + 1)
        all_boxes.append(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        all_labels.append(torch.tensor(labels, dtype=torch.int64))
    return Canvases(images, masks, all_boxes, all_labels)


class Backbone(nn.Module):
    """Conv-BN-ReLU stages to stride 8; ``out_channels`` is what torchvision's detectors read."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(1, 16, 2), conv_bn(16, 32, 2), conv_bn(32, 32), conv_bn(32, 64, 2), conv_bn(64, 64))
        self.out_channels = 64

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def detector(size: int) -> FCOS:
    """FCOS on one stride-8 feature map (anchor size = stride, as FCOS's center sampling expects); the
    transform keeps ``size`` x ``size`` canvases at their size and normalizes them like reproduce.py."""
    anchors = AnchorGenerator(sizes=((8,),), aspect_ratios=((1.0,),))
    return FCOS(Backbone(), num_classes=CLASSES, min_size=size, max_size=size, image_mean=[MEAN], image_std=[STD],
                anchor_generator=anchors, score_thresh=0.05)


def segmenter() -> FCN:
    """torchvision's FCN head over conv-BN-ReLU stages to stride 4; ``out`` is upsampled to the input size."""
    body = nn.Sequential()
    body.add_module("stem", conv_bn(1, 16))
    body.add_module("layer1", nn.Sequential(conv_bn(16, 32, 2), conv_bn(32, 32)))
    body.add_module("layer2", nn.Sequential(conv_bn(32, 64, 2), conv_bn(64, 64)))
    return FCN(IntermediateLayerGetter(body, {"layer2": "out"}), FCNHead(64, CLASSES))


def normalize(images: torch.Tensor) -> torch.Tensor:
    """The segmenter's input (the detector normalizes in its own transform)."""
    return (images - MEAN) / STD


def detection_loss(model: nn.Module, data: Canvases, idx: torch.Tensor) -> torch.Tensor:
    targets = [{"boxes": data.boxes[i], "labels": data.labels[i]} for i in idx.tolist()]
    return sum(model(list(data.images[idx]), targets).values())


def segmentation_loss(model: nn.Module, data: Canvases, idx: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(normalize(data.images[idx]))["out"], data.masks[idx])


def mean_ap(model: nn.Module, data: Canvases) -> float:
    """COCO mAP@[.5:.95] of the detector on ``data``."""
    metric = MeanAveragePrecision(iou_type="bbox")
    model.eval()
    with torch.no_grad():
        for start in range(0, len(data.images), 50):
            idx = range(start, min(start + 50, len(data.images)))
            found = model(list(data.images[start:idx.stop]))
            metric.update(found, [{"boxes": data.boxes[i], "labels": data.labels[i]} for i in idx])
    return float(metric.compute()["map"])


def mean_iou(model: nn.Module, data: Canvases) -> float:
    """mIoU of the segmenter on ``data``, background included."""
    metric = MulticlassJaccardIndex(num_classes=CLASSES, average="macro")
    model.eval()
    with torch.no_grad():
        for start in range(0, len(data.images), 100):
            metric.update(model(normalize(data.images[start:start + 100]))["out"].argmax(1), data.masks[start:start + 100])
    return float(metric.compute())


class Trainer:
    """AdamW over consecutive chunks of the (seeded, shuffled) training canvases, the learning rate falling
    from ``lr`` to 0 along a cosine within each call: each call trains on the next ``images`` canvases,
    so every run sees the same canvases in the same order at the same step. Leaves the model in eval mode."""

    def __init__(self, loss: Callable[[nn.Module, Canvases, torch.Tensor], torch.Tensor], data: Canvases, images: int, batch: int,
                 lr: float, seed: int) -> None:
        self.loss, self.data, self.images, self.batch, self.lr = loss, data, images, batch, lr
        self.order = torch.randperm(len(data.images), generator=torch.Generator().manual_seed(seed))
        self.pos = 0

    def __call__(self, model: nn.Module) -> None:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=1e-4)
        iterations = max(1, self.images // self.batch)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iterations)
        for _ in range(iterations):
            if self.pos + self.batch > len(self.order):
                self.pos = 0
            idx = self.order[self.pos:self.pos + self.batch]
            self.pos += self.batch
            opt.zero_grad(set_to_none=True)
            self.loss(model, self.data, idx).backward()
            opt.step()
            schedule.step()
        model.eval()


@dataclass
class Task:
    name: str
    metric: str
    build: Callable[[], nn.Module]
    loss: Callable[[nn.Module, Canvases, torch.Tensor], torch.Tensor]
    evaluate: Callable[[nn.Module, Canvases], float]
    inputs: Callable[[Canvases], tuple]  # example inputs: the first test canvas as the model takes it
    lr: float


@dataclass
class Row:
    task: str
    selector: str
    gflops_before: float
    gflops_after: float
    params_before: int
    params_after: int
    metric: str
    before: float
    after: float
    fps_before: float = float("nan")  # filled in at the end: all of a task's models are timed in turns
    fps_after: float = float("nan")
    wall_s: float = 0.0
    curve: list[float] | None = None  # the metric after each step, step 0 the trained model


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path.home() / ".cache" / "fxprune-data")
    p.add_argument("--install-data", action="store_true", help="apt-get install dataset-fashion-mnist when missing (as root)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--tasks", default="detection,segmentation")
    p.add_argument("--selectors", default=",".join(SELECTORS))
    p.add_argument("--size", type=int, default=64, help="canvas side in pixels")
    p.add_argument("--train", type=int, default=4_000, help="training canvases")
    p.add_argument("--test", type=int, default=500, help="test canvases")
    p.add_argument("--epochs", type=float, default=10, help="training budget of the baseline, in passes over the training canvases")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of the FLOPs to remove")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--finetune-images", type=int, default=3_000, help="fine-tuning canvases per step")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--round-to", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads (see the top for why one)")
    p.add_argument("--quick", action="store_true", help="tiny budgets: checks the script runs")
    args = p.parse_args()
    if args.quick:
        args.train, args.test, args.epochs, args.steps, args.finetune_images = 1_000, 100, 3, 2, 500
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    xtr, ytr, xte, yte = fashion_mnist(args.data, args.install_data)
    train = make_canvases((xtr[:, 0] * STD + MEAN).clamp(0, 1), ytr, args.train, args.size, seed=0)
    test = make_canvases((xte[:, 0] * STD + MEAN).clamp(0, 1), yte, args.test, args.size, seed=1)
    print(f"{args.train} training and {args.test} test canvases of {args.size}x{args.size} in {time.perf_counter() - start:.0f} s", flush=True)
    tasks = {
        "detection": Task("detection", "mAP", lambda: detector(args.size), detection_loss, mean_ap, lambda d: ([d.images[0]],), 2e-3),
        "segmentation": Task("segmentation", "mIoU", segmenter, segmentation_loss, mean_iou, lambda d: (normalize(d.images[:1]),), 2e-3),
    }
    rows: list[Row] = []
    trained_s: dict[str, float] = {}
    for task in (tasks[name] for name in args.tasks.split(",")):
        torch.manual_seed(0)
        base = task.build()
        t = time.perf_counter()
        Trainer(task.loss, train, int(args.epochs * args.train), args.batch, task.lr, seed=0)(base)
        trained_s[task.name] = time.perf_counter() - t
        inputs = task.inputs(test)
        before = task.evaluate(base, test)
        print(f"{task.name}: trained in {trained_s[task.name]:.0f} s, {task.metric} {before:.4f}", flush=True)
        models: list[nn.Module] = [base]
        for selector in args.selectors.split(","):
            torch.manual_seed(1)  # dropout during fine-tuning
            t = time.perf_counter()
            pruned, history = fxprune.prune_iteratively(
                base, ratio=args.ratio, steps=args.steps, example_inputs=inputs, selector=selector, round_to=args.round_to,
                finetune=Trainer(task.loss, train, args.finetune_images, args.batch, task.lr / 4, seed=1),
                evaluate=lambda m: task.evaluate(m, test), progress=False,
            )
            wall = time.perf_counter() - t
            rows.append(Row(task.name, selector, fxprune.count_flops(base, inputs) / 1e9, fxprune.count_flops(pruned, inputs) / 1e9,
                            params(base), params(pruned), task.metric, before, history.steps[-1].metric, wall_s=wall,
                            curve=[s.metric for s in history.steps]))
            models.append(pruned)
            print(f"{task.name} {selector}: {task.metric} {before:.4f} -> {rows[-1].after:.4f} in {wall:.0f} s; "
                  f"{fxprune.report(pruned).summary()}", flush=True)
        fps = [1e3 / lat.median_ms for lat in measure_in_turns(models, inputs, repeat=31)]
        for row, after in zip(rows[-len(models) + 1:], fps[1:]):
            row.fps_before, row.fps_after = fps[0], after
    total = time.perf_counter() - start
    print(tabulate(
        [[r.task, r.selector, f"{r.gflops_before:.4f}", f"{r.gflops_after:.4f}", f"{r.params_before / 1e3:.1f}K", f"{r.params_after / 1e3:.1f}K",
          r.metric, f"{r.before:.4f}", f"{r.after:.4f}", f"{r.fps_before:.0f}", f"{r.fps_after:.0f}", f"{r.wall_s:.0f}"] for r in rows],
        headers=["task", "selector", "GFLOPs before", "GFLOPs after", "params before", "params after", "metric", "trained", "pruned + fine-tuned",
                 "FPS before", "FPS after", "wall s"],
        tablefmt="github",
    ))
    print("baseline training: " + ", ".join(f"{k} {v:.0f} s" for k, v in trained_s.items()))
    print(f"total {total:.0f} s")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "total_s": total, "trained_s": trained_s,
                                        "rows": [asdict(r) for r in rows]}, indent=1))


if __name__ == "__main__":
    main()
