"""Command line: ``fxprune compile | inspect | report``.

MODEL is ``torchvision:NAME``, ``timm:NAME`` (when timm is installed), ``package.module:factory`` (the
current directory is importable, as with ``python -m``) or the path of a file written by ``fxprune.save``.
Built models get ``--model-arg KEY=VALUE`` as keyword arguments and the state_dict of ``--weights PATH``
(``.pt``/``.pth`` read with ``torch.load(weights_only=True)``, or ``.safetensors``); without it their
weights are random, and a warning says so. ``--calibration DIR`` (an image folder, one subfolder per
class) feeds the data-driven selectors. Stage messages go to stderr (``--quiet`` silences them,
``--verbose`` adds torch's own messages); global flags go anywhere on the line. Exit codes: 0 success,
1 an fxprune error (its whole message on stderr: what failed, the cause, the hint), 2 bad command line
(a target or option out of range included).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from . import __version__, api, pipeline, targets
from .render import draw
from .render import picture
from .archive import serialize
from .latency.cache import cache_path
from .core import metakeys as keys
from .errors import ArgumentError, FxPruneError
from .report import Report
from .selection.selectors import data_driven, takes_loss
from .selection.strategy import Strategy

log = logging.getLogger("fxprune")

EXAMPLES = """examples:
  fxprune compile torchvision:resnet50 --target-gflops 2.0
  fxprune compile torchvision:resnet50 --speedup 2 --input-shape 8,3,224,224
  fxprune compile torchvision:mobilenet_v2 --ratio 0.5 --selector l1 --input-shape 1,3,160,160 \\
      --report-dir out/ --save out/mobilenet_v2.pt2
  fxprune inspect torchvision:squeezenet1_1 --png groups.png
  fxprune report out/mobilenet_v2.pt2
  fxprune cache clear
"""


def _unknown(spec: str, kind: str, name: str, known: list[str]) -> ArgumentError:
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"; did you mean {', '.join(f'{kind}:{c}' for c in close)}?" if close else f" (see {kind}.list_models())"
    return ArgumentError(f"model {spec!r}: {kind} has no model {name!r}{hint}")


def load_model(spec: str, kwargs: dict[str, Any] | None = None, weights: str | None = None) -> nn.Module:
    """Build the model a MODEL argument names, with ``kwargs`` for its factory and the state_dict in ``weights``."""
    kwargs = kwargs or {}
    if Path(spec).is_file():
        if kwargs or weights:
            raise ArgumentError(f"model {spec!r} is a saved pruned model: it takes neither --model-arg nor --weights")
        return serialize.load(spec)  # its mode was fixed when it was exported
    source, sep, name = spec.partition(":")
    if not sep or not name:
        raise ArgumentError(f"model {spec!r}: expected torchvision:NAME, timm:NAME, package.module:factory or a saved file")
    try:
        if source == "torchvision":
            import torchvision

            if name not in torchvision.models.list_models():
                raise _unknown(spec, "torchvision", name, torchvision.models.list_models())
            model = torchvision.models.get_model(name, weights=None, **kwargs)
        elif source == "timm":
            try:
                import timm
            except ImportError as exc:
                raise ArgumentError(f"model {spec!r}: timm is not installed (pip install timm)") from exc
            if name not in timm.list_models():
                raise _unknown(spec, "timm", name, timm.list_models())
            model = timm.create_model(name, pretrained=False, **kwargs)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            try:
                factory = getattr(importlib.import_module(source), name)
            except (ImportError, AttributeError) as exc:
                raise ArgumentError(f"model {spec!r}: cannot import {name} from {source}: {exc} (the current directory and "
                                    "PYTHONPATH are searched)") from exc
            model = factory(**kwargs)
    except TypeError as exc:
        raise ArgumentError(f"model {spec!r}: its factory rejected --model-arg {kwargs}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ArgumentError(f"model {spec!r}: {name}() returned {type(model).__name__}, not an nn.Module")
    if weights is None:
        log.warning("%s has random weights: pass --weights PATH (a state_dict) to prune a trained model", spec)
    else:
        _load_weights(model, spec, weights)
    return model.eval()


def _load_weights(model: nn.Module, spec: str, path: str) -> None:
    """Load the state_dict at ``path`` into ``model`` (strictly), never unpickling code."""
    if not Path(path).is_file():
        raise ArgumentError(f"--weights {path}: no such file")
    try:
        state = safetensors.torch.load_file(path) if path.endswith(".safetensors") else torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise ArgumentError(f"--weights {path}: not a state_dict that torch.load(weights_only=True) can read: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint that wraps it
    if not isinstance(state, dict):
        raise ArgumentError(f"--weights {path}: holds a {type(state).__name__}, not a state_dict")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    resized = [f"{k} {list(v.shape)} (the model has {list(own[k].shape)})" for k, v in state.items()
               if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape]
    if missing or unexpected or resized:
        found = "; ".join(f"{what}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
                          for what, names in (("missing", missing), ("unexpected", unexpected), ("other shape", resized)) if names)
        raise ArgumentError(f"--weights {path} does not fit {spec} ({found}); pass the arguments its factory was built with "
                            "as --model-arg (e.g. --model-arg num_classes=10)")
    model.load_state_dict(state)


def _model_arg(text: str) -> tuple[str, Any]:
    """``KEY=VALUE``; VALUE is a Python literal (10, 0.5, True, (3, 3)) or else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,3,224,224, got {text!r}") from None


def _shape(text: str) -> tuple[int, ...]:
    """N,C,H,W, or C,H,W for one image (batch 1)."""
    shape = _ints(text)
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected positive sizes, got {text!r}")
    return (1, *shape) if len(shape) == 3 else shape


def _parser() -> argparse.ArgumentParser:
    flags = argparse.ArgumentParser(add_help=False)  # global flags, accepted before or after the command
    flags.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no stage messages on stderr")
    flags.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help="also torch's own messages and warnings")
    p = argparse.ArgumentParser(prog="fxprune", description="Structured channel pruning as a torch.fx pass.", parents=[flags],
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"fxprune {__version__} (torch {torch.__version__})")
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False, parents=[flags])
    common.add_argument("model", help="torchvision:NAME, timm:NAME, package.module:factory or a saved .pt2 file")
    common.add_argument("--weights", metavar="PATH", help="state_dict to load (.pt/.pth via torch.load(weights_only=True), or .safetensors)")
    common.add_argument("--model-arg", type=_model_arg, action="append", default=[], metavar="KEY=VALUE",
                        help="keyword argument for the model's factory, e.g. num_classes=10 (repeatable)")
    common.add_argument("--input-shape", type=_shape, default=api.DEFAULT_INPUT_SHAPE, metavar="N,C,H,W",
                        help="example input shape; C,H,W means batch 1 (default: 1,3,224,224)")
    c = sub.add_parser("compile", parents=[common], help="prune to a FLOPs or latency target and print the report",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = c.add_mutually_exclusive_group(required=True)
    for keyword, f in targets.Target.keywords().items():
        target.add_argument("--" + keyword.replace("_", "-"), type=float, help=f.metadata["help"], metavar=f.metadata.get("metavar"))
    for f in fields(Strategy):
        if "cli" in f.metadata:
            c.add_argument("--" + f.name.replace("_", "-"), default=f.default, **f.metadata["cli"])
    c.add_argument("--calibration", metavar="DIR", help=f"images for the data-driven selectors ({', '.join(data_driven())}): one "
                   "subfolder per class, resized to --input-shape; the gradient-based ones use cross-entropy as their loss")
    c.add_argument("--keep-classes", type=_ints, metavar="I,J,...", help="keep only these output classes (indices, any order)")
    c.add_argument("--ignore", action="append", default=[], metavar="MODULE", help="keep this module's output channels (repeatable)")
    c.add_argument("--no-verify", action="store_true", help="skip the numerical check of the result")
    c.add_argument("--no-cache", action="store_true", help="neither read nor write the timing cache (latency targets, round_to auto)")
    c.add_argument("--threads", type=int, metavar="N", help="latency targets: measure at N intra-op threads, the count you deploy "
                   f"with (default: torch's, here {torch.get_num_threads()}); 1 holds up when other work shares the cores")
    c.add_argument("--on-noise", choices=targets.NOISE_POLICIES, default="raise",
                   help="latency targets on a machine too noisy to decide: raise (default, exit 1) or warn and return the best "
                        "result with its interval")
    c.add_argument("--markdown", action="store_true", help="print the report as a markdown table")
    c.add_argument("--report-dir", metavar="DIR", help="also write report.html, report.md, report.json and widths.png there")
    c.add_argument("--save", metavar="FILE", help="save the pruned model (fxprune.save, no pickle)")
    i = sub.add_parser("inspect", parents=[common], help="print the dependency groups",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    for fmt, what in (("dot", "the groups and their members as graphviz DOT text"), ("svg", "the groups in data-flow order as SVG"),
                      ("png", "the groups in data-flow order as PNG (needs matplotlib)"), ("html", "the groups as an HTML page")):
        i.add_argument(f"--{fmt}", metavar="FILE", help=f"write {what}")
    r = sub.add_parser("report", help="print the report of a saved pruned model", parents=[flags],
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("file", help="a file written by fxprune.save or fxprune compile --save")
    r.add_argument("--markdown", action="store_true")
    k = sub.add_parser("cache", help="show or clear the timing cache", parents=[flags])
    k.add_argument("action", choices=("info", "clear"), help="info: where it is and what it holds; clear: delete it")
    return p


def _cache(action: str) -> None:
    path = cache_path()
    if action == "clear":
        path.unlink(missing_ok=True)
        print(f"cleared {path}")
        return
    tables = json.loads(path.read_text()) if path.is_file() else {}
    print(f"{path}: {sum(len(t) for t in tables.values())} timings" if tables else f"{path}: empty")
    for key, table in tables.items():
        models, decided = (sum(k.startswith(prefix) for k in table) for prefix in ("model ", "round_to="))
        print(f"  {key}: {len(table) - models - decided} layer timings, {models} model comparisons, {decided} round_to='auto' decision{'s' * (decided != 1)}")


def _inspect(args: argparse.Namespace, model: nn.Module, x: torch.Tensor) -> None:
    a = pipeline.analyze(model, x)
    print(a.deps)
    for fmt in ("dot", "svg", "png", "html"):
        if getattr(args, fmt):
            log.info("wrote %s", draw.draw_groups(a.gm, a.deps, getattr(args, fmt), args.model))


def _compile(args: argparse.Namespace, model: nn.Module, x: torch.Tensor, strategy: Strategy) -> None:
    start = time.perf_counter()
    pruned = api.compile(model, **{k: getattr(args, k) for k in targets.Target.keywords()}, example_inputs=x, strategy=strategy,
                         ignore=args.ignore, verify=not args.no_verify, keep_classes=args.keep_classes, cache=not args.no_cache,
                         on_noise=args.on_noise, threads=args.threads)
    rep = api.report(pruned)
    print(rep.to_markdown() if args.markdown else rep)
    verified = "verified" if "verified" in pruned.meta[keys.RECORD] else "not verified"
    print(f"compiled in {time.perf_counter() - start:.2f} s, {verified}")
    if args.report_dir:
        a = pipeline.analyze(model, x, args.ignore, announce=False)  # the groups of the model as given, for the report's picture
        drawing = picture.model_picture(a.gm, a.deps, rep, args.model)
        for path in draw.write_report_dir(rep, args.report_dir, drawing, args.model):
            log.info("wrote %s", path)
    if args.save:
        serialize.save(pruned, args.save)
        load = f"fxprune.load({args.save!r}{'' if isinstance(pruned, torch.fx.GraphModule) else ', model=<a fresh instance>'})"
        print(f"saved {args.save}: {load} gives the pruned model, which fine-tunes (train(), eval()); "
              f"fxprune.apply_plan(<a fresh instance of {args.model}>, {args.save!r}) prunes one by the same plan")


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def image_folder_batches(folder: str, shape: tuple[int, ...], batch: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches of an image folder with one subfolder per class (sorted: the i-th is
    class i), resized to the H, W of ``shape`` (N, C, H, W); 3 channels get ImageNet's normalization."""
    from torchvision import datasets, transforms

    if len(shape) != 4 or shape[1] not in (1, 3):
        raise ArgumentError(f"--calibration takes images: --input-shape must be N,C,H,W with 1 or 3 channels, got {shape}")
    if not Path(folder).is_dir():
        raise ArgumentError(f"--calibration {folder}: no such folder")
    steps: list[Any] = [transforms.Resize(shape[2:]), *([transforms.Grayscale()] if shape[1] == 1 else []), transforms.ToTensor()]
    if shape[1] == 3:
        steps.append(transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    try:
        images = datasets.ImageFolder(folder, transform=transforms.Compose(steps))
    except (FileNotFoundError, OSError) as exc:
        raise ArgumentError(f"--calibration {folder}: expected one subfolder of images per class: {exc}") from exc
    return list(torch.utils.data.DataLoader(images, batch_size=batch))


def _checked(args: argparse.Namespace) -> Strategy | None:
    """The compile command's target and strategy (calibration data included), checked before any model is built."""
    if args.command != "compile":
        return None
    targets.Target.of(args.on_noise, **{k: getattr(args, k) for k in targets.Target.keywords()})
    if args.keep_classes is not None:
        args.keep_classes = sorted(set(args.keep_classes))
    data: dict[str, Any] = {}
    if args.calibration is not None:
        data["calibration"] = image_folder_batches(args.calibration, args.input_shape)
        if takes_loss(args.selector):
            data["loss_fn"] = torch.nn.functional.cross_entropy
    strategy = Strategy(**{f.name: getattr(args, f.name) for f in fields(Strategy) if "cli" in f.metadata}, **data)
    strategy.chooser()  # checks that the selector and the data go together
    return strategy


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    quiet, verbose = getattr(args, "quiet", False), getattr(args, "verbose", False)
    handler = None if log.handlers else logging.StreamHandler(sys.stderr)  # this call's stderr, unless the user set one up
    if handler is not None:
        handler.setFormatter(logging.Formatter("fxprune: %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    torch_log = logging.getLogger("torch")
    torch_level = torch_log.level
    try:
        with warnings.catch_warnings():
            if not verbose:  # torch's tracing and export messages are for library authors, not for this terminal
                warnings.filterwarnings("ignore", module=r"torch\..*")
                torch_log.setLevel(logging.CRITICAL)
            return _run(args, parser)
    except FxPruneError as exc:
        print(f"fxprune: error: {exc}", file=sys.stderr)
        return 1
    finally:
        torch_log.setLevel(torch_level)
        if handler is not None:
            log.removeHandler(handler)


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.command == "report":
        rep = Report.from_dict(serialize.read_record(args.file)["report"])
        print(rep.to_markdown() if args.markdown else rep)
        return 0
    if args.command == "cache":
        _cache(args.action)
        return 0
    try:
        strategy = _checked(args)
    except ArgumentError as exc:  # a bad command line: exit 2 with the usage, as argparse's own checks do
        parser.error(str(exc))
    log.info("building %s", args.model)
    model = load_model(args.model, dict(args.model_arg), args.weights)
    x = torch.randn(args.input_shape, generator=torch.Generator().manual_seed(0))
    if args.command == "inspect":
        _inspect(args, model, x)
    else:
        _compile(args, model, x, strategy)
    return 0


if __name__ == "__main__":
    sys.exit(main())
