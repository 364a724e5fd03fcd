"""Model-zoo sweep: fxprune vs torch-pruning on every torchvision classification model.

For each model (random weights, eval mode, one 1x3xSxS input) this measures, in a fresh subprocess:

* fxprune: whether it traces, its dependency groups (total / frozen), GFLOPs before and after
  ``fxprune.compile(model, ratio=0.5, verify=True)``, the verification result, and that compile's
  wall time;
* torch-pruning: ``MetaPruner`` (which builds a ``tp.DependencyGraph``) + one step at
  ``pruning_ratio=0.5`` with L1 magnitude importance, final classifier ignored, on a deep copy of the
  model, then one forward pass. The cell is "ok (<seconds for build + step>)", with
  "out A!=B" added when the pruned output shape differs from the original, or the short error, or
  "timeout".

S is --size (default 224), except inception_v3 (at least 299) and vit_* (always 224). Video models
(--video) take 1x3xTxSxS: 16 frames at 224 for MViT and S3D (their position tables and pooling
need it), 8 frames at 112 for the others.
Every model runs in its own subprocess with a timeout, so one crash or hang costs only its row.

    python benchmarks/zoo.py                                   # all models (takes hours)
    python benchmarks/zoo.py --models resnet18,squeezenet1_1 --timeout 120 --markdown
    python benchmarks/zoo.py --timm --markdown                 # timm's CNNs and transformers (timm:NAME)
    python benchmarks/zoo.py --video --markdown                # torchvision's video models
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import subprocess
import sys
import time

import torch
import torchvision
from tabulate import tabulate
from torch import nn


TIMM_MODELS = [
    "resnet50", "resnext26ts", "efficientnet_b0", "efficientnetv2_rw_t", "regnety_008", "convnext_nano",
    "mobilenetv3_large_100", "ghostnet_100", "rexnet_100", "dla34", "densenet121", "cspresnet50",
    "repvgg_a2", "hrnet_w18_small", "mixnet_s", "tf_mobilenetv3_small_100", "resnest14d", "sebotnet33ts_256",
    "vit_tiny_patch16_224", "deit_small_patch16_224", "swin_tiny_patch4_window7_224", "efficientformer_l1",
    "levit_128s",
]


def build_model(name: str) -> nn.Module:
    """A torchvision model by name, or a timm model as ``timm:NAME``; random weights, eval mode."""
    if name.startswith("timm:"):
        import timm

        return timm.create_model(name[5:], pretrained=False).eval()
    kwargs = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    return torchvision.models.get_model(name, weights=None, **kwargs).eval()


def is_video(name: str) -> bool:
    return name in torchvision.models.list_models(module=torchvision.models.video)


def example(name: str, size: int) -> torch.Tensor:
    """The input of one model: 1x3xSxS, or 1x3xTxSxS for a video model (``input_size`` gives S)."""
    frames = (16 if name.startswith("mvit") or name == "s3d" else 8,) if is_video(name) else ()
    return torch.randn(1, 3, *frames, size, size, generator=torch.Generator().manual_seed(0))


def input_size(name: str, size: int) -> int:
    if is_video(name):
        return 224 if name.startswith("mvit") or name == "s3d" else 112
    if name.startswith("vit_"):
        return 224  # the position embedding is built for 224x224
    if name == "inception_v3":
        return max(size, 299)
    if name.endswith("_256"):  # timm models whose attention is built for 256x256
        return 256
    return size


def classifier(model: nn.Module) -> nn.Module:
    """The final classifier: the last nn.Linear, or the last conv (squeezenet has no Linear)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1]


def tp_prune(model: nn.Module, x: torch.Tensor) -> None:
    """torch-pruning: dependency graph + one 50% L1 pruning step, in place."""
    import torch_pruning as tp

    pruner = tp.pruner.MetaPruner(
        model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.5,
        ignored_layers=[classifier(model)],
    )
    pruner.step()


def short_error(exc: BaseException, limit: int = 60) -> str:
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def gflops(flops: int | None) -> str:
    return "-" if flops is None else f"{flops / 1e9:.2f}"


# --- workers: each runs in its own subprocess and prints one JSON line -------------------------------

def fx_worker(name: str, size: int) -> dict:
    import fxprune

    model = build_model(name)
    x = example(name, size)
    row = {"traced": "yes", "groups": "-", "frozen": "-", "before": None, "after": None, "time": "-"}
    try:
        groups = fxprune.analyze(model, x).groups
        row.update(groups=len(groups), frozen=sum(1 for g in groups if g.frozen))
        start = time.perf_counter()
        gm = fxprune.compile(model, ratio=0.5, example_inputs=x, verify=True)
        row["time"] = f"{time.perf_counter() - start:.1f}"
        row["before"], row["after"] = fxprune.report(gm).flops
        row["verify"] = "ok"
    except Exception as exc:
        row["traced"] = "no" if isinstance(exc, fxprune.TraceError) else "yes"
        row["verify"] = short_error(exc)
        with contextlib.suppress(Exception):
            row["before"] = fxprune.count_flops(model, x)
    return row


def tp_worker(name: str, size: int) -> dict:
    model = build_model(name)
    x = example(name, size)
    with torch.no_grad():
        expected = tuple(model(x).shape)
    pruned = copy.deepcopy(model)
    try:
        start = time.perf_counter()
        tp_prune(pruned, x)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            shape = tuple(pruned(x).shape)
    except Exception as exc:
        return {"tp": short_error(exc)}
    if shape != expected:
        return {"tp": f"ok ({seconds:.1f}s, out {shape[-1]}!={expected[-1]})", "tp_ok": False}
    return {"tp": f"ok ({seconds:.1f}s)", "tp_ok": True}


def run_worker(kind: str, name: str, size: int, timeout: float) -> dict:
    """Run one worker in a subprocess; its result, or {"error": ...} on timeout or crash."""
    cmd = [sys.executable, __file__, "--worker", kind, "--models", name, "--size", str(size)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": "timeout"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        last = (proc.stderr.strip().splitlines() or [""])[-1]
        return {"error": f"crashed (rc={proc.returncode}) {last}"[:60]}
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated model names (default: all classification models)")
    parser.add_argument("--size", type=int, default=224, help="input resolution (default 224)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per model and tool (default 300)")
    parser.add_argument("--markdown", action="store_true", help="print the table as GitHub markdown")
    parser.add_argument("--timm", action="store_true", help="timm's CNNs and transformers instead of torchvision's models")
    parser.add_argument("--video", action="store_true", help="torchvision's video models")
    parser.add_argument("--no-tp", action="store_true", help="skip torch-pruning (its column shows '-')")
    parser.add_argument("--worker", choices=["fx", "tp"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:  # inside a subprocess: one model, one tool
        work = fx_worker if args.worker == "fx" else tp_worker
        print(json.dumps(work(args.models, args.size)))
        return

    if args.models:
        names = args.models.split(",")
    elif args.timm:
        names = [f"timm:{n}" for n in TIMM_MODELS]
    elif args.video:
        names = torchvision.models.list_models(module=torchvision.models.video)
    else:
        names = torchvision.models.list_models(module=torchvision.models)
    rows, traced, verified, tp_ok = [], 0, 0, 0
    for name in names:
        size = input_size(name, args.size)
        print(f"{name} @ {size} ...", file=sys.stderr, flush=True)
        fx = run_worker("fx", name, size, args.timeout)
        tp = {"tp": "-"} if args.no_tp else run_worker("tp", name, size, args.timeout)
        traced += fx.get("traced") == "yes"
        verified += fx.get("verify") == "ok"
        tp_ok += bool(tp.get("tp_ok"))
        rows.append([
            name, f"{example(name, size).shape[2]}x{size}" if is_video(name) else size, fx.get("traced", "?"), fx.get("groups", "-"), fx.get("frozen", "-"),
            gflops(fx.get("before")), gflops(fx.get("after")), fx.get("verify", fx.get("error")),
            fx.get("time", "-"), tp.get("tp", tp.get("error")),
        ])

    headers = ["model", "size", "traced", "groups", "frozen", "GFLOPs", "GFLOPs @0.5", "fxprune verify",
               "fxprune s", "torch-pruning 0.5"]
    print(tabulate(rows, headers=headers, tablefmt="github" if args.markdown else "simple", disable_numparse=True))
    print(f"{len(names)} models: {traced} traced by fxprune, {verified} verified, "
          f"{tp_ok} pruned by torch-pruning with the original output shape")


if __name__ == "__main__":
    main()
