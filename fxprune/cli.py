"""Command line: ``fxprune compile MODEL ...`` prints the pruning report, ``fxprune inspect MODEL`` the groups.

MODEL is ``torchvision:NAME`` (built with weights=None) or ``package.module:factory`` (called with no
arguments). Exit codes: 0 success, 1 an fxprune error (one line on stderr), 2 bad command line.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Sequence

import torch
from torch import nn

from . import api
from .errors import ArgumentError, FxPruneError

EXAMPLES = """examples:
  fxprune compile torchvision:resnet50 --target-gflops 2.0
  fxprune compile torchvision:mobilenet_v2 --ratio 0.5 --selector l1 --input-shape 1,3,160,160
  fxprune inspect torchvision:squeezenet1_1
"""


def load_model(spec: str) -> nn.Module:
    """Build the model a MODEL argument names."""
    source, sep, name = spec.partition(":")
    if not sep or not name:
        raise ArgumentError(f"model {spec!r}: expected torchvision:NAME or package.module:factory")
    if source == "torchvision":
        import torchvision

        if name not in torchvision.models.list_models():
            raise ArgumentError(f"model {spec!r}: torchvision has no model {name!r} (see torchvision.models.list_models())")
        return torchvision.models.get_model(name, weights=None)
    try:
        factory = getattr(importlib.import_module(source), name)
    except (ImportError, AttributeError) as exc:
        raise ArgumentError(f"model {spec!r}: cannot import {name} from {source}: {exc}") from exc
    model = factory()
    if not isinstance(model, nn.Module):
        raise ArgumentError(f"model {spec!r}: {name}() returned {type(model).__name__}, not an nn.Module")
    return model


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,3,224,224, got {text!r}") from None
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected positive sizes, got {text!r}")
    return shape


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fxprune", description="Structured channel pruning as a torch.fx pass.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("model", help="torchvision:NAME or package.module:factory")
    common.add_argument("--input-shape", type=_shape, default=api.DEFAULT_INPUT_SHAPE, metavar="N,C,H,W",
                        help="example input shape (default: 1,3,224,224)")
    c = sub.add_parser("compile", parents=[common], help="prune to a FLOPs target and print the report",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = c.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-gflops", type=float, help="GFLOPs of the result (FLOPs = 2 x MACs)")
    target.add_argument("--ratio", type=float, help="fraction of FLOPs to remove")
    c.add_argument("--selector", default="uniform", help="uniform (default) or l1")
    c.add_argument("--ignore", action="append", default=[], metavar="MODULE", help="keep this module's output channels (repeatable)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--no-verify", action="store_true", help="skip the numerical check of the result")
    c.add_argument("--markdown", action="store_true", help="print the report as a markdown table")
    sub.add_parser("inspect", parents=[common], help="print the dependency groups",
                   epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        model = load_model(args.model).eval()
        x = torch.randn(args.input_shape, generator=torch.Generator().manual_seed(0))
        if args.command == "inspect":
            print(api.analyze(model, x))
            return 0
        start = time.perf_counter()
        pruned = api.compile(model, args.target_gflops, ratio=args.ratio, example_inputs=x, selector=args.selector,
                             ignore=args.ignore, seed=args.seed, verify=not args.no_verify)
        rep = api.report(pruned)
        print(rep.to_markdown() if args.markdown else rep)
        verified = "verified" if "verified" in pruned.meta["fxprune"] else "not verified"
        print(f"compiled in {time.perf_counter() - start:.2f} s, {verified}")
        return 0
    except FxPruneError as exc:
        print(f"fxprune: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
