"""Where a detector's time goes, before and after pruning: each top-level part and the postprocessing.

Builds the model as ``benchmarks/detection.py`` does (random weights, BatchNorm statistics estimated,
score thresholds 0 unless --thresholds says otherwise), prunes it with ``fxprune.compile(model,
ratio=...)`` and times the original and the result in turns; forward hooks time each top-level child
(backbone, rpn, roi_heads, head...) and a wrapper times ``postprocess_detections`` (inside roi_heads for
the R-CNNs). The table gives the medians in milliseconds and the pruned / original ratio of each part,
and the number of boxes that the postprocessing's NMS received and kept: its work grows with both, and
with random weights the boxes a model predicts (so how many overlap and are suppressed) depend on the
scale of its outputs, which pruning changes. --selectors prunes once per selector; "torch-pruning" there
adds torch-pruning's result at the first selector's whole-model FLOPs (as detection.py builds it).
--thresholds as in detection.py: "none" leaves the postprocessing no boxes, so the network's share shows
alone. --compile runs each model's backbone and head (SSD, RetinaNet, FCOS; the R-CNNs' RPN and RoI heads
stay eager, their work depends on the proposals) through ``torch.compile`` with inductor's freezing
(weights constant, BatchNorm folded into the convs, convs on prepacked weights), as a deployment does,
original and pruned alike; the glue and postprocessing stay eager.

    python benchmarks/detection_split.py --model ssdlite320_mobilenet_v3_large --selectors uniform,latency_per_flop
    python benchmarks/detection_split.py --model ssdlite320_mobilenet_v3_large --thresholds none --selectors uniform,torch-pruning
    python benchmarks/detection_split.py --model ssdlite320_mobilenet_v3_large --thresholds none --compile
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from tabulate import tabulate
from torch import nn
from torchvision.ops import boxes as box_ops

import fxprune
from detection import THRESHOLDS_HELP, build, example, tp_at


class PartClock:
    """Milliseconds spent in each top-level child of a detector and in its postprocessing, per forward."""

    def __init__(self, model: nn.Module) -> None:
        self.ms: dict[str, list[float]] = defaultdict(list)
        self.started: dict[str, float] = {}
        for name, child in model.named_children():
            if name != "transform":
                child.register_forward_pre_hook(lambda _m, _a, name=name: self.started.__setitem__(name, time.perf_counter()))
                child.register_forward_hook(lambda _m, _a, _o, name=name: self.stop(name))
        owner = getattr(model, "roi_heads", model)
        owner.postprocess_detections = self.timed(owner.postprocess_detections, "postprocess")

    def stop(self, name: str) -> None:
        self.ms[name].append(1e3 * (time.perf_counter() - self.started[name]))

    def timed(self, fn: Callable[..., Any], name: str) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            self.started[name] = time.perf_counter()
            out = fn(*args, **kwargs)
            self.stop(name)
            return out
        return run


def nms_boxes(model: nn.Module, inputs: tuple[Any, ...]) -> list[tuple[int, int]]:
    """(boxes in, boxes kept) of each batched NMS call of one forward: NMS work grows with both."""
    seen, original = [], box_ops.batched_nms

    def counting(boxes: torch.Tensor, *args: Any) -> torch.Tensor:
        keep = original(boxes, *args)
        seen.append((boxes.shape[0], keep.numel()))
        return keep

    box_ops.batched_nms = counting
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        box_ops.batched_nms = original
    return seen


def compiled(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose backbone and head run through ``torch.compile`` with freezing."""
    import torch._inductor.config  # noqa: PLC0415 - only --compile needs inductor

    torch._inductor.config.freezing = True
    model = copy.deepcopy(model)
    for name in ("backbone", "head"):
        if hasattr(model, name):
            setattr(model, name, torch.compile(getattr(model, name)))
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="fasterrcnn_resnet50_fpn")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--selectors", default="uniform", help="comma-separated selectors, one pruned model each")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--thresholds", choices=("zero", "model", "none"), default="zero", help=THRESHOLDS_HELP)
    ap.add_argument("--compile", action="store_true", help="run every model's backbone and head through torch.compile (freezing)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    model, inputs = build(args.model, args.size, args.thresholds), example(args.model, args.size)
    labels = ["original", *args.selectors.split(",")]
    models = [model]
    for label in labels[1:]:
        models.append(tp_at(model, inputs, fxprune.count_flops(models[1], inputs)) if label == "torch-pruning"
                      else fxprune.compile(model, ratio=args.ratio, example_inputs=inputs, selector=label))
    if args.compile:
        models = [compiled(m) for m in models]
    boxes = [nms_boxes(m, inputs) for m in models]
    clocks, totals = [PartClock(m) for m in models], [[] for _ in models]
    with torch.no_grad():
        for m in models:
            m(*inputs)
        for clock in clocks:
            clock.ms.clear()
        for _ in range(args.repeat):
            for m, total in zip(models, totals):
                t = time.perf_counter()
                m(*inputs)
                total.append(1e3 * (time.perf_counter() - t))
    rows = []
    for part in [*clocks[0].ms, "forward"]:
        ms = [statistics.median(c.ms[part] if part != "forward" else t) for c, t in zip(clocks, totals)]
        rows.append([part, *(f"{v:.1f}" for v in ms), *(f"{v / ms[0]:.2f}" for v in ms[1:])])
    headers = ["part", *(f"{label} ms" for label in labels), *(f"{label} ratio" for label in labels[1:])]
    print(tabulate(rows, headers=headers, tablefmt="github"))
    print(f"\nratio={args.ratio:g}; boxes into / kept by each NMS: " + "; ".join(f"{label} {b}" for label, b in zip(labels, boxes)))
    print(f"{args.model}, input {args.size}, {args.threads} threads, thresholds {args.thresholds}, "
          f"{'network parts torch.compiled (freezing), ' if args.compile else ''}medians of {args.repeat} forwards in turns")


if __name__ == "__main__":
    main()
