"""The public API: compose the passes. Nothing here touches a graph directly."""

from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.fx
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .errors import ArgumentError, PlanError
from .flops import FlopModel, total_macs
from .graph import DependencyGraph, Plan
from .passes.annotate import annotate
from .passes.capture import capture, structural_copy
from .passes.classes import class_plan
from .passes.couple import couple
from .passes.rewrite import rewrite
from .passes.select import MODES, WidthRule, removed_mask, select
from .passes.shapes import eval_mode, propagate_shapes
from .passes.verify import verify as verify_pass
from .record import provenance
from .report import Report
from .selectors import Selector, get_selector, selector_name
from .stats import ClassSubset, LossFn

__all__ = ["compile", "analyze", "prune", "keep_only_classes", "report", "count_flops", "DEFAULT_INPUT_SHAPE"]

log = logging.getLogger("fxprune")

DEFAULT_INPUT_SHAPE = (1, 3, 224, 224)
"""Shape of the example input used when none is given: one seeded ``torch.randn`` image batch."""

Inputs = torch.Tensor | Sequence[Any] | None
Model = nn.Module | torch.export.ExportedProgram


def _example_inputs(example_inputs: Inputs, seed: int) -> tuple[Any, ...]:
    if example_inputs is None:
        gen = torch.Generator().manual_seed(seed)
        return (torch.randn(DEFAULT_INPUT_SHAPE, generator=gen),)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise ArgumentError(
        f"example_inputs must be a tensor or a tuple of positional inputs, got {type(example_inputs).__name__}"
    )


@dataclass
class _Analysis:
    gm: torch.fx.GraphModule
    graph: DependencyGraph
    flops: FlopModel
    inputs: tuple[Any, ...]


def _check_ignore(model: Model, ignore: Iterable[str]) -> tuple[str, ...]:
    if isinstance(ignore, str):
        ignore = (ignore,)
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    names = {n for n, _ in model.named_modules()}
    out = tuple(ignore)
    for name in out:
        if name not in names:
            close = difflib.get_close_matches(name, sorted(names), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ArgumentError(f"ignore= names module {name!r}, which {type(model).__name__} does not have{hint}")
    return out


def _analyze(model: Model, example_inputs: Inputs, ignore: Iterable[str], seed: int, free_output: bool = False) -> _Analysis:
    ignore = _check_ignore(model, ignore)
    if example_inputs is None and isinstance(model, torch.export.ExportedProgram) and model.example_inputs:
        example_inputs = model.example_inputs[0]
    inputs = _example_inputs(example_inputs, seed)
    gm = capture(model, inputs)
    log.info("captured %d graph nodes with %s", len(gm.graph.nodes), gm.meta["fxprune_capture"])
    propagate_shapes(gm, inputs)
    graph = couple(gm, ignore, free_output)
    log.info("%d channel groups, %d prunable; %.4g GFLOPs", len(graph.groups), len(graph.prunable_groups), 2 * total_macs(gm) / 1e9)
    return _Analysis(gm, graph, FlopModel(graph, total_macs(gm)), inputs)


def analyze(model: Model, example_inputs: Inputs = None, *, ignore: Iterable[str] = ()) -> DependencyGraph:
    """Dependency groups of ``model``: which channels must be pruned together, which cannot and why."""
    return _analyze(model, example_inputs, ignore, 0).graph


def _finish(a: _Analysis, plan: Plan, verify: bool) -> torch.fx.GraphModule:
    pruned = rewrite(a.gm, a.graph, plan)
    removed = removed_mask(a.graph, plan)
    record = pruned.meta["fxprune"]
    log.info("rewrote the graph: %d of %d channel atoms removed", int(removed.sum()), a.graph.num_atoms)
    if verify:
        result = verify_pass(a.gm, pruned, a.graph, removed, a.inputs)
        record["verified"] = {"max_abs_error": result.max_abs_error, "tolerance": result.tolerance}
        log.info("verified: max error %.3g (tolerance %.3g)", result.max_abs_error, result.tolerance)
    record["report"] = annotate(a.gm, pruned, a.graph, removed, a.flops).to_dict()
    record["plan"] = json.loads(plan.to_json())
    record.update(provenance(a.graph, a.inputs))
    return pruned


def _restricted(model: Model, example_inputs: Inputs, keep_classes: Sequence[int], verify: bool) -> tuple[torch.fx.GraphModule, tuple[Any, ...]]:
    a = _analyze(model, example_inputs, (), 0, free_output=True)
    pruned = _finish(a, class_plan(a.gm, a.graph, keep_classes), verify)
    pruned.meta["fxprune"]["classes"] = [int(c) for c in keep_classes]
    return pruned, a.inputs


def keep_only_classes(model: Model, keep_classes: Sequence[int], example_inputs: Inputs = None, *, verify: bool = True) -> torch.fx.GraphModule:
    """``model`` with only the outputs ``keep_classes`` (sorted class indices along dim 1 of its one output
    tensor): the final classifier loses the other classes' rows, and output ``i`` is class ``keep_classes[i]``.
    Nothing else changes, so the kept outputs equal the original's logits. ``meta["fxprune"]["classes"]``
    records the kept classes."""
    return _restricted(model, example_inputs, keep_classes, verify)[0]


def _check_target(target_gflops: float | None, ratio: float | None) -> None:
    if (target_gflops is None) == (ratio is None):
        raise ArgumentError("give exactly one of target_gflops= (GFLOPs of the result) or ratio= (fraction of FLOPs to remove)")
    if ratio is not None and not 0.0 <= ratio < 1.0:
        raise ArgumentError(f"ratio must be in [0, 1), got {ratio}")
    if target_gflops is not None and not target_gflops > 0:
        raise ArgumentError(f"target_gflops must be positive, got {target_gflops}")


@dataclass(frozen=True)
class Strategy:
    """How channels are chosen: a selector, a budget mode and a width rule (see passes/select.py)."""

    selector: Selector
    mode: str
    rule: WidthRule
    comparable: bool

    @classmethod
    def make(cls, selector: str | Selector, calibration: Any, loss_fn: LossFn | None, mode: str | None, min_width: int, round_to: int) -> "Strategy":
        if mode is not None and mode not in MODES:
            raise ArgumentError(f"unknown mode {mode!r}; choose 'per_group' (same fraction of every group) or 'global' (all channels ranked together)")
        rule = WidthRule(min_width, round_to)
        sel = get_selector(selector, calibration, loss_fn)
        comparable = bool(getattr(sel, "comparable_across_groups", False))
        if comparable and mode == "per_group":
            raise ArgumentError(f"selector {selector_name(sel)!r} ranks channels of different groups against each other; it needs mode='global' (its default)")
        return cls(sel, "global" if comparable else mode or "per_group", rule, comparable)

    def describe(self, seed: int) -> dict[str, Any]:
        """JSON-ready record of the strategy, kept in ``meta["fxprune"]["strategy"]``."""
        return {"selector": selector_name(self.selector), "mode": self.mode, "min_width": self.rule.min_width, "round_to": self.rule.round_to, "seed": seed}

    def plan(self, a: _Analysis, target_macs: float, scores: dict[int, torch.Tensor]) -> Plan:
        """The plan for ``target_macs``; under torch.distributed, rank 0's plan, on every rank."""
        plan = select(a.graph, a.flops, target_macs, scores, mode=self.mode, rule=self.rule, comparable=self.comparable)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            shared = [plan.to_json()]
            dist.broadcast_object_list(shared, src=0)
            plan = Plan.from_json(shared[0])
        return plan


def compile(  # noqa: A001 - the product's verb
    model: Model,
    target_gflops: float | None = None,
    *,
    ratio: float | None = None,
    example_inputs: Inputs = None,
    selector: str | Selector = "uniform",
    ignore: Iterable[str] = (),
    seed: int = 0,
    verify: bool = True,
    calibration: Any = None,
    loss_fn: LossFn | None = None,
    mode: str | None = None,
    min_width: int = 1,
    round_to: int = 1,
    keep_classes: Sequence[int] | None = None,
) -> torch.fx.GraphModule:
    """Prune ``model`` to a FLOPs budget and return a new, smaller ``torch.fx.GraphModule``.

    Give exactly one of ``target_gflops`` (GFLOPs of the result, FLOPs = 2 x MACs of conv, linear and
    matmul as counted by ``FlopCounterMode``) or ``ratio`` (fraction of those FLOPs to remove).
    ``example_inputs`` defaults to one seeded ``torch.randn(1, 3, 224, 224)``. ``ignore`` names modules
    whose output channels must stay. The model's outputs never lose channels and ``model`` itself is never
    modified. With ``verify=True`` the result is checked against the masked original (see verify.py).
    ``model`` may also be a ``torch.export.ExportedProgram`` (its example inputs are the default then).

    ``selector``: a name (uniform, random, l1, l2, bn_scale, gflops_aware, apoz, mean_activation, taylor)
    or an object with a ``scores(graph, gm)`` method. The data-driven ones (apoz, mean_activation,
    taylor) need ``calibration``: an iterable of batches (e.g. a DataLoader), each an input tensor,
    ``(input,)`` or ``(input, target)``, input being a tensor or a tuple of positional inputs (a single
    tensor is one batch); taylor also needs ``loss_fn(output, target)`` (target None for batches without
    one). ``mode``: "per_group" (the default: every group loses the same fraction) or "global" (all
    channels ranked together; always for gflops_aware). Every pruned group keeps at least ``min_width``
    channel atoms, and a multiple of ``round_to`` when it is wider than that.
    See passes/select.py for the exact rules.

    ``keep_classes``: sorted class indices; the result outputs only those (see ``keep_only_classes``,
    applied first) and calibration uses only their samples (targets renumbered to match the outputs).
    The report then starts from ``model`` as given, all its classes included.
    Under ``torch.distributed`` every rank gets rank 0's plan.
    """
    _check_target(target_gflops, ratio)
    if keep_classes is not None:
        model, example_inputs = _restricted(model, example_inputs, keep_classes, verify)
        calibration = None if calibration is None else ClassSubset(calibration, list(keep_classes))
    strategy = Strategy.make(selector, calibration, loss_fn, mode, min_width, round_to)
    a = _analyze(model, example_inputs, ignore, seed)
    total = total_macs(a.gm)
    target = target_gflops * 1e9 / 2 if target_gflops is not None else (1.0 - ratio) * total
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        scores = strategy.selector.scores(a.graph, a.gm)
    pruned = _finish(a, strategy.plan(a, target, scores), verify)
    pruned.meta["fxprune"]["strategy"] = strategy.describe(seed)
    if keep_classes is not None:  # one report from the user's model: ``model`` is the class-restricted one here
        pruned.meta["fxprune"]["classes"] = [int(c) for c in keep_classes]
        pruned.meta["fxprune"]["report"] = report(model).then(report(pruned)).to_dict()
    return pruned


def prune(model: Model, plan: Plan | dict[int, Sequence[int]], example_inputs: Inputs = None, *, verify: bool = True) -> torch.fx.GraphModule:
    """Apply an explicit plan: for each group id of ``analyze(model)``, the positions of atoms to keep."""
    a = _analyze(model, example_inputs, (), 0)
    plan = plan if isinstance(plan, Plan) else Plan({int(k): list(v) for k, v in plan.items()})
    for gid, keep in plan.keep.items():
        if not 0 <= gid < len(a.graph.groups):
            raise PlanError(f"plan names group {gid}, but the model has groups 0..{len(a.graph.groups) - 1}")
        g = a.graph.groups[gid]
        keep = list(keep)
        if g.frozen and len(keep) != g.width:
            raise PlanError(f"group {gid} is frozen ({g.frozen[0]}); it must keep all {g.width} channels")
        if not keep or len(set(keep)) != len(keep) or min(keep) < 0 or max(keep) >= g.width:
            raise PlanError(f"group {gid} (width {g.width}, first member {g.members[0]}): keep must be distinct positions in 0..{g.width - 1}, at least one")
    return _finish(a, plan, verify)


def report(gm: torch.fx.GraphModule) -> Report:
    """The FLOP/parameter report of a GraphModule returned by ``compile`` or ``prune``."""
    record = getattr(gm, "meta", {}).get("fxprune") if isinstance(gm, torch.fx.GraphModule) else None
    if not record or "report" not in record:
        raise ArgumentError("report() takes a GraphModule returned by fxprune.compile or fxprune.prune; for any other module use fxprune.count_flops")
    return Report.from_dict(record["report"])


def count_flops(module: nn.Module, example_inputs: Inputs) -> int:
    """FLOPs (2 x MACs) that ``FlopCounterMode`` counts for one eval-mode forward; ``module`` is untouched."""
    inputs = _example_inputs(example_inputs, 0)
    copy = structural_copy(module)
    with torch.no_grad(), eval_mode(copy), FlopCounterMode(display=False) as counter:
        copy(*inputs)
    return int(counter.get_total_flops())
