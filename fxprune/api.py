"""The public API: ``compile``, ``analyze``, ``prune``, ``keep_only_classes``, ``report``, ``count_flops``.

Each is a few calls into ``pipeline``; nothing here touches a graph.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn

from .core import metakeys as keys
from . import pipeline
from . import targets
from .errors import ArgumentError, MeasurementError, TargetUnreachableError
from .core.flops import counter as flop_counter
from .core.fxutil import eval_mode, structural_copy
from .core.groups import DependencyGraph, Plan
from .pipeline import DEFAULT_INPUT_SHAPE, Inputs, Model
from .report import Report
from .selection.strategy import Strategy
from .latency.cache import caching
from .results.depth import decode_comparison, layer_influence, without_layers

log = logging.getLogger("fxprune")

__all__ = ["compile", "analyze", "prune", "drop_layers", "keep_only_classes", "report", "count_flops", "DEFAULT_INPUT_SHAPE"]


def analyze(model: Model, example_inputs: Inputs = None, *, ignore: Iterable[str] = ()) -> DependencyGraph:
    """Dependency groups of ``model``: which channels must be pruned together, which cannot and why."""
    return pipeline.analyze(model, example_inputs, ignore).deps


def keep_only_classes(model: Model, keep_classes: Sequence[int], example_inputs: Inputs = None, *, verify: bool = True) -> torch.fx.GraphModule:
    """``model`` with only the outputs ``keep_classes`` (sorted class indices along dim 1 of its one output
    tensor): the final classifier loses the other classes' rows, and output ``i`` is class ``keep_classes[i]``.
    Nothing else changes, so the kept outputs equal the original's logits up to float rounding.
    ``meta["fxprune"]["classes"]`` records the kept classes."""
    return pipeline.restrict_classes(model, example_inputs, keep_classes, verify)[0]


def compile(  # noqa: A001 - the product's verb
    model: Model,
    *,
    target_gflops: float | None = None,
    ratio: float | None = None,
    speedup: float | None = None,
    target_latency_ms: float | None = None,
    example_inputs: Inputs = None,
    strategy: Strategy | None = None,
    ignore: Iterable[str] = (),
    verify: bool = True,
    keep_classes: Sequence[int] | None = None,
    cache: bool = True,
    on_noise: str = "raise",
    threads: int | None = None,
    **options: Any,
) -> nn.Module:
    """Prune ``model`` to a FLOPs or latency budget and return a new, smaller ``torch.fx.GraphModule`` (for a
    detector, a pruned copy of its module tree; for a Hugging Face model, a model of its class when a config
    can describe the pruned widths, see results/hfmodel.py).

    Give exactly one of ``target_gflops`` (GFLOPs of the result, FLOPs = 2 x MACs of conv, linear and
    matmul as counted by ``FlopCounterMode``), ``ratio`` (fraction of those FLOPs to remove), ``speedup``
    (the result's measured latency is at most the original's divided by it) or ``target_latency_ms``.
    Latency is measured on the device that holds the model, at the batch size of ``example_inputs``, with
    ``threads`` intra-op threads (default: torch's current count; give the count you deploy with), in eval
    mode under no_grad (see ``measure_latency``). The machine is checked first, for about 2 s or nine rounds of a
    slower model (the log says how long; up to three times as long while it looks noisy): one too noisy to
    decide the target, or whose threads stall on cores that other work holds, raises ``MeasurementError`` at
    once, saying what was measured and what to do. Then a latency cost model
    built from timings of the model's own layers picks the widths, and each candidate is timed in turns
    with the original until the interval of its speed-up decides the target (see targets/latency.py). A
    machine too noisy to decide raises ``MeasurementError`` (``on_noise="warn"``: the best result is
    returned with a warning that gives its interval). Stable timings are cached on disk (``$FXPRUNE_CACHE_DIR``, default ``~/.cache/fxprune``) per
    device, torch version, thread count and dtype, and a cached result is timed once more before it is
    returned; ``cache=False`` neither reads nor writes the cache (``fxprune cache clear`` empties it).
    ``example_inputs`` defaults to one seeded ``torch.randn(1, 3, 224, 224)``. ``ignore`` names modules
    whose output channels must stay. The model's outputs never lose channels and ``model`` itself is never
    modified. With ``verify=True`` the result is checked against the masked original (see verify.py).
    ``model`` may also be a ``torch.export.ExportedProgram`` (its example inputs are the default then).

    How channels are chosen is a ``Strategy``: pass one as ``strategy=``, or its fields as keywords
    (``selector=``, ``mode=``, ``min_width=``, ``round_to=``, ``equal_widths=``, ``seed=``, ``calibration=``, ``loss_fn=``,
    ``compensate=``),
    which replace the given strategy's. ``selector``: a name in ``fxprune.SELECTORS`` or an object with
    a ``scores(graph, gm)`` method; by default uniform; given ``calibration``, wanda for a FLOPs target
    (the most accurate before healing on the decoder of docs/results.md) and, with ``loss_fn`` too, bn_taylor
    for a latency target (the most accurate at equal measured latency in docs/results.md).
    The data-driven ones (``fxprune.selection.selectors.data_driven()``) need
    ``calibration``: an iterable of batches (e.g. a DataLoader), each an input tensor, ``(input,)`` or
    ``(input, target)``, input being a tensor or a tuple of positional inputs (a single tensor is one
    batch); those ranking by gradients also need ``loss_fn(output, target)`` (target None for batches
    without one). ``mode``: "per_group" (the default: every group
    loses the same fraction) or "global" (all channels ranked together; always for gflops_aware, latency_aware and latency_per_flop). Every
    pruned group keeps at least ``min_width`` channel atoms and a multiple of ``round_to`` channels (of
    its half, quarter... when the group is narrower); ``round_to="auto"`` (the default) is 8 for a FLOPs
    target (on any machine; 1 for a model without a layer of 64 channels or more) and, for a latency
    target, the multiple of 8 or 16 measured fastest on this device (see latency/costmodel.py); it falls
    back to finer multiples when its own leaves the target out of reach, saying so in the report. ``equal_widths``: layers that repeat (the same
    parameters but for the layer index) keep equal widths; by default true for Hugging Face models under
    per-group budgets (their configs hold one size per model), else false. See selection/budget.py for the exact rules.

    ``compensate=True`` (with ``calibration``) folds the mean of each removed channel over the calibration data
    into the bias of the linear layer that alone reads it (attention's output projection, an MLP's down
    projection: FLAP's bias compensation, results/compensate.py); a Hugging Face result turns on the config
    flags that give its class those biases (``attention_bias``, ``mlp_bias``) or comes back as the graph.

    ``keep_classes``: sorted class indices; the result outputs only those (see ``keep_only_classes``,
    applied first) and calibration uses only their samples (targets renumbered to match the outputs).
    The report then starts from ``model`` as given, all its classes included.
    Under ``torch.distributed`` every rank gets rank 0's plan.
    """
    target = targets.Target.of(on_noise, target_gflops=target_gflops, ratio=ratio, speedup=speedup, target_latency_ms=target_latency_ms)
    _check_threads(threads, target)
    chosen = Strategy.of(strategy, **_default_selector(strategy, target, options)).for_model(model)
    with caching(cache):
        job = pipeline.restrict_classes_first(model, example_inputs, chosen, keep_classes, verify)
        a = pipeline.analyze(job.model, job.inputs, ignore, chosen.seed)
        pruned, job.chooser = targets.reach(a, job.chooser, target, chosen.seed, verify, threads)
    if not target.measured and target.macs(a.flops.total) >= a.flops.total and keep_classes is None:  # keeping classes is a reason too
        note = (f"the target ({target.describe()}) asks for no pruning: the model has {2 * a.flops.total / 1e9:.4g} GFLOPs; "
                "nothing was removed")
        warnings.warn(f"fxprune.compile: {note}", stacklevel=2)
        pruned.meta[keys.RECORD]["report"]["notes"].append(note)
    return pipeline.fill_record(job, pruned, report(pruned))


def _check_threads(threads: int | None, target: targets.Target) -> None:
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ArgumentError(f"threads must be a positive integer (the thread count you deploy with), got {threads!r}")
    if not target.measured:
        raise ArgumentError(f"threads={threads} sets the thread count a latency target is measured at; {target.describe()} is a FLOPs "
                            "target, which takes no timing: leave threads out, or ask for speedup= or target_latency_ms=")


LATENCY_WITH_DATA = "bn_taylor"
"""The selector of a latency target given ``calibration=`` and ``loss_fn=`` and no selector: the most
accurate at equal measured latency in docs/results.md, ahead of the knapsack selectors (without data,
the default stays uniform)."""

FLOPS_WITH_DATA = "wanda"
"""The selector of a FLOPs target given ``calibration=`` and no selector. On benchmarks/llm.py (a 4-layer
Llama-shaped decoder trained on torch's source, docs/results.md), held-out bits per byte before healing
at 20% / 32% / 50% fewer decoder parameters (dense 2.163, seed 0): wanda 2.317 / 2.726 / 3.246, taylor
2.455 / 2.733 / 3.276, l2 2.408 / 3.117 / 4.019, random 2.474 / 3.266 / 3.796, uniform 2.695 / 3.793 /
4.108: ahead of l2 and random at every ratio, and of taylor, which also needs a loss. It reads no loss:
a ``loss_fn=`` given with it is left unread, with a warning (``selector="taylor"`` ranks by it)."""


def _default_selector(strategy: Strategy | None, target: targets.Target, options: dict[str, Any]) -> dict[str, Any]:
    """``options``, with a data-driven selector when they give calibration data and name none:
    ``LATENCY_WITH_DATA`` for a latency target given a loss too, ``FLOPS_WITH_DATA`` for a FLOPs target."""
    if strategy is not None or "selector" in options or options.get("calibration") is None:
        return options
    loss = options.get("loss_fn") is not None
    if target.measured:
        return {**options, "selector": LATENCY_WITH_DATA} if loss else options
    if loss:
        warnings.warn(f"fxprune.compile: loss_fn= is not read by {FLOPS_WITH_DATA!r}, the default selector of a FLOPs target given "
                      "calibration= (the most accurate before healing in docs/results.md); pass selector='taylor' to rank by the loss",
                      stacklevel=3)
    return {**options, "selector": FLOPS_WITH_DATA, "loss_fn": None}


def drop_layers(model: nn.Module, n: int | None = None, calibration: Any = None, *, speedup: float | None = None,
                example_inputs: torch.Tensor | None = None, new_tokens: int = 32) -> nn.Module:
    """A Hugging Face decoder of ``model``'s class without its layers of least influence on the
    ``calibration`` batches (1 - the cosine similarity of a layer's output hidden states to its input;
    results/depth.py): depth pruning, which saves a whole layer's per-token cost in ``generate()``.

    Give ``n`` (how many layers go) or ``speedup``: the fewest layers whose removal makes ``generate()`` of
    ``new_tokens`` greedy tokens after the ``example_inputs`` prompt (token ids) that much faster than the
    original, timed in turns with it on this machine until the interval decides (``MeasurementError``
    when the machine is too noisy to; ``TargetUnreachableError`` when keeping one layer is not enough).
    ``meta["fxprune"]["depth"]`` records every layer's influence, the layers dropped and, for ``speedup``,
    the measured decode speed-up. ``model`` is left as it was; combine with ``compile`` (widths) in either
    order, and heal afterwards as after ``compile`` (``distillation``)."""
    if (n is None) == (speedup is None):
        raise ArgumentError("drop_layers takes n= (how many layers to drop) or speedup= (decode tokens/s over the original's), one of them")
    if calibration is None:
        raise ArgumentError("drop_layers scores layers on calibration= data (batches of token ids, e.g. a DataLoader)")
    influence = layer_influence(model, calibration)
    order = torch.argsort(influence, stable=True).tolist()
    record: dict[str, Any] = {"influence": [round(float(v), 6) for v in influence]}
    if speedup is None:
        if isinstance(n, bool) or not isinstance(n, int) or not 0 < n < len(influence):
            raise ArgumentError(f"drop_layers: n must be a whole number of layers from 1 to {len(influence) - 1}, got {n!r}")
        result = without_layers(model, sorted(order[:n]))
    else:
        result = _decode_target(model, order, speedup, example_inputs, new_tokens, record)
    record["dropped"] = sorted(order[: len(influence) - result.config.num_hidden_layers])
    result.meta = {keys.RECORD: {"depth": record}}
    return result


def _decode_target(model: nn.Module, order: list[int], speedup: float, prompt: torch.Tensor | None, new_tokens: int,
                   record: dict[str, Any]) -> nn.Module:
    """The model without the fewest of ``order``'s first layers whose decode speed-up meets ``speedup``."""
    if not isinstance(prompt, torch.Tensor) or prompt.dtype not in (torch.long, torch.int):
        raise ArgumentError("drop_layers(speedup=...) times generate() after a prompt: pass example_inputs= token ids, e.g. a (1, 64) tensor")
    if not speedup > 1:
        raise ArgumentError(f"drop_layers: speedup must be above 1, got {speedup!r}")
    best = None
    for k in range(1, len(order)):
        small = without_layers(model, sorted(order[:k]))
        c = decode_comparison(model, small, prompt, new_tokens, 1 / speedup)
        log.info("without %d of %d layers: decode %s", k, len(order), c.describe())
        verdict = c.meets(1 / speedup)
        if verdict is None:
            raise MeasurementError(f"drop_layers: the machine was too noisy to tell whether dropping {k} layers meets {speedup}x decode tokens/s "
                                   f"({c.describe()}); run again on a quieter machine, or give n=", interval=(1 / c.high, 1 / c.low), noise=c.noise)
        if verdict:
            record["decode"] = {"speedup": c.speedup, "interval": [1 / c.high, 1 / c.low], "noise": c.noise, "new_tokens": new_tokens,
                                "prompt": list(prompt.shape)}
            return small
        best = max(best or 0.0, c.speedup)
    raise TargetUnreachableError(f"drop_layers: {speedup}x decode tokens/s is out of reach: keeping one layer of {len(order)} measured "
                                 f"{best:.3g}x", best_speedup=best)


def prune(model: Model, plan: Plan | dict[int, Sequence[int]], example_inputs: Inputs = None, *, verify: bool = True) -> nn.Module:
    """Apply an explicit plan: for each group id of ``analyze(model)``, the positions of atoms to keep."""
    return pipeline.apply_checked_plan(pipeline.analyze(model, example_inputs), plan, verify)


def report(gm: nn.Module) -> Report:
    """The FLOP/parameter report of a model returned by ``compile`` or ``prune``."""
    meta = getattr(gm, "meta", None)
    record = meta.get(keys.RECORD) if isinstance(gm, nn.Module) and isinstance(meta, dict) else None
    if not record or "report" not in record:
        raise ArgumentError(f"report() takes a model returned by fxprune.compile or fxprune.prune (or fxprune.load), not this "
                            f"{type(gm).__name__}: it carries no fxprune record. A pruned model pickled with torch.save comes "
                            "back without it; fxprune.save and fxprune.load keep it. For any other module use fxprune.count_flops")
    return Report.from_dict(record["report"])


def count_flops(module: nn.Module, example_inputs: Inputs) -> int:
    """FLOPs (2 x MACs) that ``FlopCounterMode`` counts for one eval-mode forward, fused attention
    included (``flops.counter``); ``module`` is untouched."""
    pipeline.check_model(module)
    inputs = pipeline.example_inputs(example_inputs)
    copy = structural_copy(module)
    with torch.no_grad(), eval_mode(copy), flop_counter() as counter:
        copy(*inputs)
    return int(counter.get_total_flops())
