"""The same model captured both ways, symbolic tracing and torch.export, gets the same channel groups.

For every torchvision classification model (random weights, eval mode, one 1x3xSxS input; S is 64,
112 for Swin, 224 for ViT and MaxViT, 299 for Inception v3) this prints the number of groups and of
frozen groups found on each path, and the frozen reasons where they differ. The coupling rules are
one table for both paths: an aten op maps to the torch function or Tensor method of the same name.

    python benchmarks/capture_paths.py                       # the whole zoo (about 7 minutes)
    python benchmarks/capture_paths.py --models resnet18,swin_t --markdown
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import time
import warnings

import torch
import torchvision
from tabulate import tabulate

from fxprune.passes.capture import capture
from fxprune.passes.couple import couple
from fxprune.passes.shapes import propagate_shapes


def input_size(name: str) -> int:
    if name == "inception_v3":
        return 299
    if name.startswith(("vit", "maxvit")):
        return 224
    return 112 if name.startswith("swin") else 64


def groups(gm: torch.fx.GraphModule, x: torch.Tensor) -> tuple[int, int, collections.Counter]:
    """(groups, frozen groups, frozen reasons without node names) of a captured graph."""
    propagate_shapes(gm, (x,))
    graph = couple(gm)
    reasons = collections.Counter(re.sub(r"(at )?node \S+ ?", "", r) for g in graph.groups for r in g.frozen)
    return len(graph.groups), sum(1 for g in graph.groups if g.frozen), reasons


def compare(name: str) -> tuple[tuple[int, int, collections.Counter], tuple[int, int, collections.Counter]]:
    kwargs = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    size = input_size(name)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    traced = groups(capture(model, (x,)), x)
    exported = groups(capture(torch.export.export(model, (x,), strict=False), (x,)), x)
    return traced, exported


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated model names (default: every classification model)")
    parser.add_argument("--markdown", action="store_true", help="print the table as GitHub markdown")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    names = args.models.split(",") if args.models else torchvision.models.list_models(module=torchvision.models)
    rows, same = [], 0
    for name in names:
        print(f"{name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        (g1, f1, _), (g2, f2, reasons) = compare(name)
        same += (g1, f1) == (g2, f2)
        differs = "" if (g1, f1) == (g2, f2) else "; ".join(f"{n}x {r}" for r, n in reasons.items() if not r.startswith("model "))
        rows.append([name, f"{g1} / {f1}", f"{g2} / {f2}", "same" if not differs else differs, f"{time.perf_counter() - start:.0f}"])
    print(tabulate(rows, headers=["model", "symbolic_trace: groups / frozen", "torch.export: groups / frozen",
                                  "torch.export's extra frozen reasons", "s"],
                   tablefmt="github" if args.markdown else "simple", disable_numparse=True))
    print(f"{len(names)} models, {same} with the same groups on both paths")


if __name__ == "__main__":
    main()
