"""Command line: ``fxprune compile | inspect | report``.

MODEL is ``torchvision:NAME`` (weights=None), ``timm:NAME`` (pretrained=False, when timm is installed),
``package.module:factory`` (called with no arguments) or the path of a file written by ``fxprune.save``.
Stage messages go to stderr (``--quiet`` silences them). Exit codes: 0 success, 1 an fxprune error (one
line on stderr), 2 bad command line.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

import torch
from torch import nn

from . import api, draw, serialize
from . import metakeys as keys
from .errors import ArgumentError, FxPruneError
from .strategy import Strategy

log = logging.getLogger("fxprune")

EXAMPLES = """examples:
  fxprune compile torchvision:resnet50 --target-gflops 2.0
  fxprune compile torchvision:resnet50 --speedup 2 --input-shape 8,3,224,224
  fxprune compile torchvision:mobilenet_v2 --ratio 0.5 --selector l1 --input-shape 1,3,160,160 \\
      --report-dir out/ --save out/mobilenet_v2.pt2
  fxprune inspect torchvision:squeezenet1_1 --png groups.png
  fxprune report out/mobilenet_v2.pt2
"""


def load_model(spec: str) -> nn.Module:
    """Build the model a MODEL argument names."""
    if Path(spec).is_file():
        return serialize.load(spec)  # its mode was fixed when it was exported
    source, sep, name = spec.partition(":")
    if not sep or not name:
        raise ArgumentError(f"model {spec!r}: expected torchvision:NAME, timm:NAME, package.module:factory or a saved file")
    if source == "torchvision":
        import torchvision

        if name not in torchvision.models.list_models():
            raise ArgumentError(f"model {spec!r}: torchvision has no model {name!r} (see torchvision.models.list_models())")
        return torchvision.models.get_model(name, weights=None).eval()
    if source == "timm":
        try:
            import timm
        except ImportError as exc:
            raise ArgumentError(f"model {spec!r}: timm is not installed (pip install timm)") from exc
        if name not in timm.list_models():
            raise ArgumentError(f"model {spec!r}: timm has no model {name!r} (see timm.list_models())")
        return timm.create_model(name, pretrained=False).eval()
    try:
        factory = getattr(importlib.import_module(source), name)
    except (ImportError, AttributeError) as exc:
        raise ArgumentError(f"model {spec!r}: cannot import {name} from {source}: {exc}") from exc
    model = factory()
    if not isinstance(model, nn.Module):
        raise ArgumentError(f"model {spec!r}: {name}() returned {type(model).__name__}, not an nn.Module")
    return model.eval()


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,3,224,224, got {text!r}") from None


def _shape(text: str) -> tuple[int, ...]:
    shape = _ints(text)
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected positive sizes, got {text!r}")
    return shape


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fxprune", description="Structured channel pruning as a torch.fx pass.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    p.add_argument("--quiet", action="store_true", help="no stage messages on stderr")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("model", help="torchvision:NAME, timm:NAME, package.module:factory or a saved .pt2 file")
    common.add_argument("--input-shape", type=_shape, default=api.DEFAULT_INPUT_SHAPE, metavar="N,C,H,W",
                        help="example input shape (default: 1,3,224,224)")
    c = sub.add_parser("compile", parents=[common], help="prune to a FLOPs or latency target and print the report",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = c.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-gflops", type=float, help="GFLOPs of the result (FLOPs = 2 x MACs)")
    target.add_argument("--ratio", type=float, help="fraction of FLOPs to remove")
    target.add_argument("--speedup", type=float, metavar="S", help="measured latency at most the original's / S (on this machine)")
    target.add_argument("--target-latency-ms", type=float, metavar="T", help="measured latency at most T milliseconds")
    for f in fields(Strategy):
        if "cli" in f.metadata:
            c.add_argument("--" + f.name.replace("_", "-"), default=f.default, **f.metadata["cli"])
    c.add_argument("--keep-classes", type=_ints, metavar="I,J,...", help="keep only these output classes (sorted indices)")
    c.add_argument("--ignore", action="append", default=[], metavar="MODULE", help="keep this module's output channels (repeatable)")
    c.add_argument("--no-verify", action="store_true", help="skip the numerical check of the result")
    c.add_argument("--markdown", action="store_true", help="print the report as a markdown table")
    c.add_argument("--report-dir", metavar="DIR", help="also write report.md, report.json and widths.png there")
    c.add_argument("--save", metavar="FILE", help="save the pruned model (fxprune.save, no pickle)")
    i = sub.add_parser("inspect", parents=[common], help="print the dependency groups",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    for fmt in ("dot", "svg", "png"):
        i.add_argument(f"--{fmt}", metavar="FILE", help=f"draw the dependency graph as {fmt.upper()}")
    r = sub.add_parser("report", help="print the report of a saved pruned model",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("file", help="a file written by fxprune.save or fxprune compile --save")
    r.add_argument("--markdown", action="store_true")
    return p


def _inspect(args: argparse.Namespace, model: nn.Module, x: torch.Tensor) -> None:
    graph = api.analyze(model, x)
    print(graph)
    for fmt in ("dot", "svg", "png"):
        if getattr(args, fmt):
            log.info("wrote %s", draw.draw_groups(graph, getattr(args, fmt)))


def _compile(args: argparse.Namespace, model: nn.Module, x: torch.Tensor) -> None:
    start = time.perf_counter()
    strategy = Strategy(**{f.name: getattr(args, f.name) for f in fields(Strategy) if "cli" in f.metadata})
    pruned = api.compile(model, args.target_gflops, ratio=args.ratio, speedup=args.speedup, target_latency_ms=args.target_latency_ms,
                         example_inputs=x, strategy=strategy,
                         ignore=args.ignore, verify=not args.no_verify, keep_classes=args.keep_classes)
    rep = api.report(pruned)
    print(rep.to_markdown() if args.markdown else rep)
    verified = "verified" if "verified" in pruned.meta[keys.RECORD] else "not verified"
    print(f"compiled in {time.perf_counter() - start:.2f} s, {verified}")
    if args.report_dir:
        for path in draw.write_report_dir(rep, args.report_dir):
            log.info("wrote %s", path)
    if args.save:
        serialize.save(pruned, args.save)
        log.info("wrote %s", args.save)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("fxprune: %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        if args.command == "report":
            rep = api.report(serialize.load(args.file))
            print(rep.to_markdown() if args.markdown else rep)
            return 0
        log.info("building %s", args.model)
        model = load_model(args.model)
        x = torch.randn(args.input_shape, generator=torch.Generator().manual_seed(0))
        (_inspect if args.command == "inspect" else _compile)(args, model, x)
        return 0
    except FxPruneError as exc:
        print(f"fxprune: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
