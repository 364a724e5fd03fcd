"""The pipeline, composed once: capture -> shapes -> couple -> select -> rewrite -> verify -> annotate.

``compile``, ``prune``, ``keep_only_classes``, ``prune_iteratively``, ``apply_plan``, the command line
and the torch.compile backend all go through these functions; none of them calls a pass directly.
"""

from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
import torch.fx
from torch import nn

from . import metakeys as keys
from .errors import ArgumentError
from .flops import FlopModel, total_macs
from .graph import DependencyGraph, Plan
from .masks import removed_mask
from .passes.annotate import annotate
from .passes.capture import capture
from .passes.classes import class_plan
from .passes.couple import couple
from .passes.rewrite import rewrite
from .passes.select import select
from .passes.shapes import propagate_shapes
from .passes.verify import verify as verify_pass
from .record import provenance
from .report import Report
from .stats import ClassSubset
from .strategy import Chooser, Strategy

__all__ = ["DEFAULT_INPUT_SHAPE", "Inputs", "Model", "Analysis", "Target", "Job", "example_inputs", "analyze",
           "select_plan", "finish", "start", "conclude"]

log = logging.getLogger("fxprune")

DEFAULT_INPUT_SHAPE = (1, 3, 224, 224)
"""Shape of the example input used when none is given: one seeded ``torch.randn`` image batch."""

Inputs = torch.Tensor | Sequence[Any] | None
Model = nn.Module | torch.export.ExportedProgram


def example_inputs(given: Inputs, seed: int = 0) -> tuple[Any, ...]:
    """``given`` as a tuple of positional inputs; None is one seeded ``DEFAULT_INPUT_SHAPE`` image."""
    if given is None:
        gen = torch.Generator().manual_seed(seed)
        return (torch.randn(DEFAULT_INPUT_SHAPE, generator=gen),)
    if isinstance(given, torch.Tensor):
        return (given,)
    if isinstance(given, (tuple, list)):
        return tuple(given)
    raise ArgumentError(f"example_inputs must be a tensor or a tuple of positional inputs, got {type(given).__name__}")


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


@dataclass
class Analysis:
    """A captured, shape-annotated graph with its dependency groups and FLOP model."""

    gm: torch.fx.GraphModule
    graph: DependencyGraph
    flops: FlopModel
    inputs: tuple[Any, ...]


def analyze(model: Model, given: Inputs = None, ignore: Iterable[str] = (), seed: int = 0, free_output: bool = False) -> Analysis:
    """Capture ``model``, annotate shapes and FLOPs, and couple its channels."""
    ignore = _check_ignore(model, ignore)
    if given is None and isinstance(model, torch.export.ExportedProgram) and model.example_inputs:
        given = model.example_inputs[0]
    inputs = example_inputs(given, seed)
    gm = capture(model, inputs)
    log.info("captured %d graph nodes with %s", len(gm.graph.nodes), gm.meta[keys.CAPTURE])
    propagate_shapes(gm, inputs)
    graph = couple(gm, ignore, free_output)
    total = total_macs(gm)
    log.info("%d channel groups, %d prunable; %.4g GFLOPs", len(graph.groups), len(graph.prunable_groups), 2 * total / 1e9)
    return Analysis(gm, graph, FlopModel(graph, total), inputs)


@dataclass(frozen=True)
class Target:
    """What the result must cost: exactly one of ``gflops`` (of the result) or ``ratio`` (of FLOPs removed)."""

    gflops: float | None = None
    ratio: float | None = None

    def __post_init__(self) -> None:
        if (self.gflops is None) == (self.ratio is None):
            raise ArgumentError("give exactly one of target_gflops= (GFLOPs of the result) or ratio= (fraction of FLOPs to remove)")
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise ArgumentError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.gflops is not None and not self.gflops > 0:
            raise ArgumentError(f"target_gflops must be positive, got {self.gflops}")

    def macs(self, total: int) -> float:
        """The MACs budget for a model of ``total`` MACs (FLOPs = 2 x MACs)."""
        return self.gflops * 1e9 / 2 if self.gflops is not None else (1.0 - self.ratio) * total


def select_plan(a: Analysis, chooser: Chooser, target_macs: float, scores: dict[int, torch.Tensor]) -> Plan:
    """The plan for ``target_macs`` given the selector's ``scores``; under torch.distributed, rank 0's
    plan, on every rank."""
    plan = select(a.graph, a.flops, target_macs, scores, mode=chooser.mode, rule=chooser.rule, comparable=chooser.comparable)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        shared = [plan.to_json()]
        dist.broadcast_object_list(shared, src=0)
        plan = Plan.from_json(shared[0])
    return plan


def finish(a: Analysis, plan: Plan, verify: bool) -> torch.fx.GraphModule:
    """Rewrite ``a`` as ``plan`` says, verify it (when asked) and record the report, plan and provenance."""
    pruned = rewrite(a.gm, a.graph, plan)
    removed = removed_mask(a.graph, plan)
    record = pruned.meta[keys.RECORD]
    log.info("rewrote the graph: %d of %d channel atoms removed", int(removed.sum()), a.graph.num_atoms)
    if verify:
        result = verify_pass(a.gm, pruned, a.graph, removed, a.inputs)
        record["verified"] = {"max_abs_error": result.max_abs_error, "tolerance": result.tolerance}
        log.info("verified: max error %.3g (tolerance %.3g)", result.max_abs_error, result.tolerance)
    record["report"] = annotate(a.gm, pruned, a.graph, removed, a.flops).to_dict()
    record["plan"] = json.loads(plan.to_json())
    record.update(provenance(a.graph, a.inputs))
    return pruned


def restrict_classes(model: Model, given: Inputs, keep_classes: Sequence[int], verify: bool) -> tuple[torch.fx.GraphModule, tuple[Any, ...]]:
    """``model`` with only the outputs ``keep_classes``, and the example inputs it was checked on."""
    a = analyze(model, given, free_output=True)
    pruned = finish(a, class_plan(a.gm, a.graph, keep_classes), verify)
    pruned.meta[keys.RECORD]["classes"] = [int(c) for c in keep_classes]
    return pruned, a.inputs


@dataclass
class Job:
    """What a pruning run starts from: the model (class-restricted when asked), its inputs, the chooser,
    and the report of what was done before the first pruning step (None: nothing)."""

    model: Model
    inputs: Inputs
    chooser: Chooser
    keep_classes: list[int] | None
    before: Report | None


def start(model: Model, given: Inputs, strategy: Strategy, keep_classes: Sequence[int] | None, verify: bool) -> Job:
    """Restrict classes first when asked (calibration then sees only their samples, renumbered)."""
    if keep_classes is None:
        return Job(model, given, strategy.chooser(), None, None)
    model, given = restrict_classes(model, given, keep_classes, verify)
    if strategy.calibration is not None:
        strategy = replace(strategy, calibration=ClassSubset(strategy.calibration, list(keep_classes)))
    return Job(model, given, strategy.chooser(), [int(c) for c in keep_classes], Report.from_dict(model.meta[keys.RECORD]["report"]))


def conclude(job: Job, result: torch.fx.GraphModule, report: Report, extra: dict[str, Any] | None = None) -> torch.fx.GraphModule:
    """Record on ``result`` the report from the model as given (``report`` joined after the class
    restriction's), the strategy and the kept classes."""
    record = result.meta[keys.RECORD]
    record["report"] = (report if job.before is None else job.before.then(report)).to_dict()
    record["strategy"] = {**job.chooser.describe(), **(extra or {})}
    if job.keep_classes is not None:
        record["classes"] = job.keep_classes
    return result
