"""Frames per second of whole detectors and segmenters, before and after pruning, side by side.

Every model has random weights (weights=None) and runs in eval mode at batch 1 on --threads CPU threads.
Detectors get one seeded random image of --size x --size; the R-CNN, RetinaNet and FCOS transforms
resize to --size (min_size=max_size=size) and SSD to its own fixed size. Score thresholds are set to 0,
so every image yields the full number of detections and the mask and keypoint heads run on all of them
(random weights would otherwise yield none and skip those heads), and the R-CNNs' RPN NMS threshold to
1.0, so that the RPN always passes its full 1000 proposals to the RoI heads, as a trained R-CNN does on
a real image: with random weights, NMS at 0.7 keeps a number of proposals that depends on the weights
(859 for one model, 1000 for its pruned copy), and the two would do different amounts of RoI work.
BatchNorm statistics are estimated on four random images before anything else (``normalized``): random
weights with the initial statistics leave activations unnormalized, and their scale then decides where
proposals fall and how many boxes survive. With ``--thresholds model`` the detectors keep their own
thresholds: random weights' class scores (about 1/91 each) mostly miss the R-CNNs' 0.05 and RetinaNet's
and FCOS's, so their NMS and the mask and keypoint heads get almost nothing to do (a trained detector on
a real image lies between the two settings), while SSD's 0.001 lets them all pass as 0 does. With
``--thresholds none`` they are 1, which no score passes: the final NMS and the mask and keypoint heads
get nothing (the RPN NMS stays at 1.0), and what is timed is the networks and the fixed glue.
Segmenters take a 1x3xSxS tensor.
Rows per model:

* ``ratio=0.5``: ``fxprune.compile(model, ratio=0.5, example_inputs=...)``, default settings
  (round_to="auto"), verified;
* ``ratio=0.5, SELECTOR`` for each of --selectors (e.g. ``latency_per_flop``), verified;
* ``speedup=2`` (with --speedup): ``fxprune.compile(model, speedup=2)``, which measures its result;
* ``torch-pruning``: ``MetaPruner`` with L1 importance and ``round_to=8``, the predictors (class, box,
  mask, keypoint outputs) ignored, at the per-layer ratio (bisection, at most 6 tries) that gives the
  whole-model FLOPs of the ``ratio=0.5`` row within 3%. Not tried on Mask and Keypoint R-CNN: building
  its dependency graph of their whole forward ran out of memory here (MemoryError under a 22 GB limit;
  without one the kernel killed the process at 24 GB).

The original and all rows of one model are timed in turns (``fxprune.latency.timing.measure_in_turns``,
--repeat rounds); the table gives frames per second, the latency ratio to the original, the whole-model
FLOPs (``fxprune.count_flops``: FlopCounterMode over the real forward, postprocessing included) and
the share of parameters outside the backbone's feature extractor (FPN, extra layers and heads) left.

    python benchmarks/detection.py --markdown
    python benchmarks/detection.py --models ssdlite320_mobilenet_v3_large,lraspp_mobilenet_v3_large --size 320 --speedup
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings
from typing import Any

import torch
import torchvision
from tabulate import tabulate
from torch import nn

import fxprune
from fxprune.latency.timing import measure_in_turns
from latency import SELECTORS_HELP, closest_ratio, selector_rows

DETECTORS = ("fasterrcnn_resnet50_fpn,fasterrcnn_resnet50_fpn_v2,fasterrcnn_mobilenet_v3_large_fpn,"
             "fasterrcnn_mobilenet_v3_large_320_fpn,retinanet_resnet50_fpn,retinanet_resnet50_fpn_v2,ssd300_vgg16,"
             "ssdlite320_mobilenet_v3_large,fcos_resnet50_fpn,maskrcnn_resnet50_fpn,maskrcnn_resnet50_fpn_v2,"
             "keypointrcnn_resnet50_fpn")
SEGMENTERS = "fcn_resnet50,deeplabv3_mobilenet_v3_large,lraspp_mobilenet_v3_large"
# Parameters of the backbone's feature extractor; the rest is FPN, extra layers and heads.
FEATURES = ("backbone.body.", "backbone.features.", "backbone.")
# Modules whose outputs are the model's predictions: torch-pruning must keep their output channels.
PREDICTORS = ("cls_logits", "bbox_pred", "bbox_reg", "bbox_ctrness", "cls_score", "mask_fcn_logits", "kps_score_lowres",
              "classification_head.module_list", "regression_head.module_list", "classifier.4", "classifier.low_classifier",
              "classifier.high_classifier", "aux_classifier.4")


def is_detector(name: str) -> bool:
    return name in DETECTORS.split(",")


# --thresholds: the detectors' score threshold; "model" keeps each model's own.
SCORE_THRESHOLDS = {"zero": 0.0, "none": 1.0}
THRESHOLDS_HELP = ("zero (default): score thresholds 0 and the R-CNNs' RPN NMS at 1.0, the full detections and the heaviest "
                   "postprocessing; model: the model's own thresholds, which random weights' scores (about 1/91 per class) "
                   "mostly miss, so the R-CNNs' NMS and mask/keypoint heads get almost nothing; none: score thresholds 1, "
                   "which no score passes (the RPN NMS at 1.0 as with zero): no box reaches the final NMS or the mask and "
                   "keypoint heads, so what is timed is the networks and the fixed glue")


def build(name: str, size: int, thresholds: str = "zero") -> nn.Module:
    """The model with random weights, configured as the module docstring says."""
    kwargs: dict[str, Any] = {}
    score = SCORE_THRESHOLDS.get(thresholds)  # None: the model's own
    if "rcnn" in name:
        kwargs = {"min_size": size, "max_size": size, **({"box_score_thresh": score, "rpn_nms_thresh": 1.0} if score is not None else {})}
    elif name.startswith(("retinanet", "fcos")):
        kwargs = {"min_size": size, "max_size": size, **({"score_thresh": score} if score is not None else {})}
    elif name.startswith("ssd") and score is not None:
        kwargs = {"score_thresh": score}
    extra = {"weights_backbone": None} if is_detector(name) else {"weights_backbone": None, "aux_loss": False}
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **extra, **kwargs).eval()
    return normalized(model, name, size)


def normalized(model: nn.Module, name: str, size: int, images: int = 4) -> nn.Module:
    """``model`` with BatchNorm statistics estimated on ``images`` seeded random images, as a trained
    model has them. With the initial statistics (mean 0, variance 1) a random ResNet's activations grow
    block after block; the pruned copy, summing fewer channels, then sees other proposals and boxes (all
    1000 of its RPN proposals small and on the finest FPN level, against large boxes on coarse levels for
    the original) and does other RoI and NMS work than the original, which is not what pruning changes."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model
    gen = torch.Generator().manual_seed(1)
    batch = [torch.rand(3, size, size, generator=gen) for _ in range(images)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a plain average over the batch
        m.train()
    with torch.no_grad():
        model(batch if is_detector(name) else torch.stack(batch))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
        m.eval()
    return model


def example(name: str, size: int) -> tuple[Any, ...]:
    image = torch.rand(3, size, size, generator=torch.Generator().manual_seed(0))
    return ([image],) if is_detector(name) else (image[None],)


def head_params(model: nn.Module, name: str) -> int:
    """Parameters outside the feature extractor (detectors) or the backbone (segmenters)."""
    prefixes = FEATURES[:2] if is_detector(name) else FEATURES[2:]
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(prefixes))


def tp_at(model: nn.Module, inputs: tuple[Any, ...], flops: int) -> nn.Module:
    """torch-pruning's result at the per-layer ratio whose whole-model FLOPs match ``flops``."""
    import torch_pruning as tp  # noqa: PLC0415 - the peer is optional here

    def prune(p: float) -> nn.Module:
        m = copy.deepcopy(model)
        ignored = [mod for n, mod in m.named_modules() if any(n.endswith(s) or f".{s}." in f".{n}." for s in PREDICTORS)]
        tp.pruner.MetaPruner(m, inputs, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=p, round_to=8,
                             ignored_layers=ignored, output_transform=outputs).step()
        return m

    return closest_ratio(prune, lambda m: fxprune.count_flops(m, inputs), flops, tries=6, tolerance=0.03, hi=0.9)


def outputs(out: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a model's output (a list of dicts for detectors, a dict for segmenters)."""
    items = [v for d in out for v in d.values()] if isinstance(out, list) else list(out.values())
    return [v for v in items if v.is_floating_point()]


def compile_row(model: nn.Module, inputs: tuple[Any, ...], **kw: Any) -> tuple[nn.Module, float] | str:
    t = time.perf_counter()
    try:
        return fxprune.compile(model, example_inputs=inputs, **kw), time.perf_counter() - t
    except fxprune.FxPruneError as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=f"{DETECTORS},{SEGMENTERS}")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=7, help="timing rounds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--thresholds", choices=("zero", "model", "none"), default="zero", help=THRESHOLDS_HELP)
    ap.add_argument("--selectors", default="", help=SELECTORS_HELP)
    ap.add_argument("--speedup", action="store_true", help="add a speedup=2 row")
    ap.add_argument("--no-tp", action="store_true", help="skip torch-pruning")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--json", help="also write the rows as JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    rows, records, started = [], [], time.perf_counter()
    for name in args.models.split(","):
        model, inputs = build(name, args.size, args.thresholds), example(name, args.size)
        base_flops, base_heads = fxprune.count_flops(model, inputs), head_params(model, name)
        variants: dict[str, tuple[nn.Module, float]] = {}
        wanted = [("ratio=0.5", {"ratio": 0.5}), *selector_rows(args.selectors),
                  *([("speedup=2", {"speedup": 2.0, "verify": False})] if args.speedup else [])]
        for label, kw in wanted:
            got = compile_row(model, inputs, **kw)
            if isinstance(got, str):
                print(f"{name} {label}: {got}", flush=True)
            else:
                variants[label] = got
        if not args.no_tp and name.startswith(("maskrcnn", "keypointrcnn")):
            print(f"{name} torch-pruning: not tried (out of memory building its dependency graph, see the docstring)", flush=True)
        elif not args.no_tp and "ratio=0.5" in variants:
            t = time.perf_counter()
            try:
                variants["torch-pruning"] = tp_at(model, inputs, fxprune.count_flops(variants["ratio=0.5"][0], inputs)), time.perf_counter() - t
            except Exception as exc:  # noqa: BLE001 - the peer's failure is a result too
                print(f"{name} torch-pruning: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", flush=True)
        timed = measure_in_turns([model, *(v[0] for v in variants.values())], inputs, repeat=args.repeat, warmup=2)
        original = timed[0]
        for (label, (pruned, seconds)), lat in zip(variants.items(), timed[1:]):
            rec = {"model": name, "row": label, "size": args.size, "fps_before": 1e3 / original.median_ms,
                   "fps_after": 1e3 / lat.median_ms, "latency_ratio": lat.median_ms / original.median_ms,
                   "gflops_before": base_flops / 1e9, "gflops_after": fxprune.count_flops(pruned, inputs) / 1e9,
                   "heads_left": head_params(pruned, name) / base_heads, "compile_s": seconds}
            records.append(rec)
            rows.append([name, label, f"{rec['gflops_before']:.1f} -> {rec['gflops_after']:.1f}",
                         f"{rec['gflops_after'] / rec['gflops_before']:.2f}", f"{rec['heads_left']:.2f}",
                         f"{rec['fps_before']:.2f} -> {rec['fps_after']:.2f}", f"{rec['latency_ratio']:.2f}", f"{seconds:.0f}"])
            print(tabulate([rows[-1]], tablefmt="plain"), flush=True)
    headers = ["model", "row", "GFLOPs", "FLOPs ratio", "heads' params left", "FPS", "latency ratio", "compile s"]
    fmt = "github" if args.markdown else "simple"
    print()
    print(tabulate(rows, headers=headers, tablefmt=fmt))
    by_row: dict[str, list[float]] = {}
    for r in records:
        by_row.setdefault(r["row"], []).append(r["latency_ratio"])
    print()
    print(tabulate([[k, f"{statistics.median(v):.2f}", f"{max(v):.2f}", len(v)] for k, v in by_row.items()],
                   headers=["row", "median latency ratio", "worst", "models"], tablefmt=fmt))
    print(f"\n{len(args.models.split(','))} models, input {args.size}, {args.threads} threads, thresholds {args.thresholds}, "
          f"{time.perf_counter() - started:.0f} s in all")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
