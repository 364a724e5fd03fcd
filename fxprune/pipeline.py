"""The pipeline, composed once: capture -> shapes -> couple -> select -> rewrite -> verify -> annotate.

``compile``, ``prune``, ``keep_only_classes``, ``prune_iteratively``, ``apply_plan``, the command line
and the torch.compile backend all go through these functions; none of them calls a pass directly.
"""

from __future__ import annotations

import difflib
import functools
import logging
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
import torch.fx
from torch import nn

from .core import metakeys as keys
from .errors import ArgumentError, PlanError, ShapeError, TargetUnreachableError, VerificationError
from .core.flops import FlopModel, total_macs
from .core.groups import DependencyGraph, Plan
from .core.masks import removed_mask
from .core.fxutil import modules_of
from .passes.annotate import annotate
from .passes.capture import capture
from .selection.classes import class_plan
from .passes.couple import couple
from .passes.rewrite import rewrite
from .selection.budget import CostModel, Tie, select
from .passes.shapes import propagate_shapes
from .results.compensate import compensate
from .results.transplant import transplant
from .results.hfconfig import Probe, config_ties, probe, valid_hidden
from .results.hfmodel import hf_model
from .passes.verify import verify as verify_pass
from .passes.verify import verify_same, verify_tree
from .core.provenance import provenance
from .report import Report
from .selection.stats import ClassSubset
from .selection.strategy import Chooser, Strategy

__all__ = ["DEFAULT_INPUT_SHAPE", "Inputs", "Model", "Analysis", "Job", "example_inputs", "check_model", "analyze", "select_plan",
           "build_result", "apply_checked_plan", "restrict_classes", "restrict_classes_first", "fill_record"]

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
    ignore = (ignore,) if isinstance(ignore, str) else tuple(ignore)
    if not ignore:
        return ignore
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    names = set(modules_of(model))
    for name in ignore:
        if name not in names:
            close = difflib.get_close_matches(name, sorted(names), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ArgumentError(f"ignore= names module {name!r}, which {type(model).__name__} does not have{hint}")
    return ignore


@dataclass
class Analysis:
    """A captured, shape-annotated graph with its dependency groups and FLOP model."""

    gm: torch.fx.GraphModule
    deps: DependencyGraph
    flops: FlopModel
    inputs: tuple[Any, ...]
    modules: dict[str, nn.Module]
    """``modules_of(gm)``, walked once: every pass of a compile reads it, and fxprune never changes ``gm``'s tree."""
    beyond_config: str = ""
    """Why the last plan prunes past what a Hugging Face model's config can describe (empty if it does not)."""

    @property
    def tree(self) -> nn.Module | None:
        """The module tree whose one run ``gm`` records (an ops-run capture), else None."""
        return self.gm.meta.get(keys.TREE)

    @functools.cached_property
    def probe(self) -> Probe | None:
        """What a Hugging Face model's config sizes (results/hfconfig.py); None for other models."""
        hf = self.gm.meta.get(keys.HF)
        return probe(hf) if hf is not None else None

    @functools.cached_property
    def ties(self) -> list[Tie]:
        """Groups whose widths a Hugging Face model's config describes only together (results/hfconfig.py);
        none for other models."""
        return [] if self.probe is None else config_ties(self.probe, self.deps)

    @property
    def model(self) -> nn.Module:
        """What runs as the model does on any input: ``gm``, the module tree it recorded, or the Hugging
        Face model it was exported from (which shares its tensors)."""
        for model in (self.tree, self.gm.meta.get(keys.HF)):
            if model is not None:
                return model
        return self.gm

    def result(self, pruned: torch.fx.GraphModule) -> nn.Module:
        """The user's result of ``pruned`` (``gm`` rewritten): itself, a pruned copy of the module tree, or a
        Hugging Face model of the original's class when its config can describe the widths (else ``pruned``,
        its record saying why: ``meta["fxprune"]["huggingface"]``)."""
        tree, hf = self.tree, self.gm.meta.get(keys.HF)
        if tree is not None:
            return transplant(tree, pruned)
        if hf is None:
            return pruned
        model, why, rtol = hf_model(hf, pruned)
        why = self.beyond_config or why
        if model is not None:  # its own forward must give the pruned graph's outputs
            try:
                verify_same(pruned, model, self.inputs, rtol)
            except VerificationError as exc:
                model, why = None, f"{str(exc).rstrip('.')}: its code derives something from the config's widths that the pruned weights do not follow"
        pruned.meta[keys.RECORD]["huggingface"] = {"class": type(hf).__name__, "returned": type(model or pruned).__name__,
                                                   **({"why": why} if why else {})}
        if model is None:
            log.warning("the result is a GraphModule, not a %s: %s", type(hf).__name__, why)
            return pruned
        model.meta = pruned.meta
        return model


def analyze(model: Model, given: Inputs = None, ignore: Iterable[str] = (), seed: int = 0, free_output: bool = False,
            announce: bool = True) -> Analysis:
    """Capture ``model``, annotate shapes and FLOPs, and couple its channels; ``announce``: log what was
    captured (False for a second analysis of a model already announced)."""
    check_model(model)
    ignore = _check_ignore(model, ignore)
    if given is None and isinstance(model, torch.export.ExportedProgram) and model.example_inputs:
        given = model.example_inputs[0]
    inputs = example_inputs(given, seed)
    gm = capture(model, inputs)
    modules = modules_of(gm)
    try:
        propagate_shapes(gm, inputs, modules)
    except ShapeError as exc:
        if gm.meta[keys.CAPTURE] != "torch.fx.symbolic_trace":
            raise
        try:  # a traced graph that cannot run: fall back to torch.export
            gm = capture(model, inputs, untraceable=exc)
            modules = modules_of(gm)
            propagate_shapes(gm, inputs, modules)
        except Exception:
            raise exc from None
    level = logging.INFO if announce else logging.DEBUG
    log.log(level, "captured %d graph nodes with %s", len(gm.graph.nodes), gm.meta[keys.CAPTURE])
    graph = couple(gm, ignore, free_output, modules)
    total = total_macs(gm)
    log.log(level, "%d channel groups, %d prunable; %.4g GFLOPs", len(graph.groups), len(graph.prunable_groups), 2 * total / 1e9)
    return Analysis(gm, graph, FlopModel(graph, total), inputs, modules)


def check_model(model: Any) -> None:
    """An ``ArgumentError`` that says what to pass instead, unless ``model`` is a module or an ExportedProgram."""
    if isinstance(model, (nn.Module, torch.export.ExportedProgram)):
        return
    if isinstance(model, str):
        hint = (f" To prune a model by name, build it first (e.g. torchvision.models.get_model({model.partition(':')[2] or model!r})); "
                "the command line takes names like torchvision:resnet18.")
    elif callable(model):
        hint = f" {getattr(model, '__name__', 'it')} looks like a factory or function: call it to build the module."
    else:
        hint = ""
    raise ArgumentError(f"fxprune prunes a torch.nn.Module (a torch.fx.GraphModule included) or a torch.export.ExportedProgram; "
                        f"got {type(model).__name__}.{hint}")


def select_plan(a: Analysis, chooser: Chooser, target: float, scores: dict[int, torch.Tensor], cost: CostModel | None = None) -> Plan:
    """The plan whose ``cost`` (default: ``a.flops``, in MACs) fits ``target`` given the selector's
    ``scores``; under torch.distributed, rank 0's plan, on every rank."""
    ties = a.ties if chooser.rule.equal_widths else []
    try:
        plan = select(a.deps, cost or a.flops, target, scores, mode=chooser.mode, rule=chooser.rule, comparable=chooser.comparable, ties=ties)
        plan = valid_hidden(a.probe, a.deps, plan, scores, chooser.rule.round_to) if ties else plan
        a.beyond_config = ""
    except TargetUnreachableError as exc:
        if not ties:
            raise
        plan = select(a.deps, cost or a.flops, target, scores, mode=chooser.mode, rule=chooser.rule, comparable=chooser.comparable)
        a.beyond_config = (f"the widths that {type(a.gm.meta[keys.HF]).__name__}'s config can describe (in proportion, whole heads) "
                           f"do not reach the target ({str(exc).split(':')[0]}), so the plan prunes past them")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        shared = [plan.to_json()]
        dist.broadcast_object_list(shared, src=0)
        plan = Plan.from_json(shared[0])
    return plan


def build_result(a: Analysis, plan: Plan, verify: bool, pruned: torch.fx.GraphModule | None = None,
                 compensation: Any = None) -> nn.Module:
    """Rewrite ``a`` as ``plan`` says (unless ``pruned`` is that rewrite already), verify the result (when
    asked), fold the means of the removed channels over the ``compensation`` data into the biases that
    read them (results/compensate.py; None: not) and record the report, plan and provenance in its ``meta``."""
    pruned = rewrite(a.gm, a.deps, plan, a.modules) if pruned is None else pruned
    removed = removed_mask(a.deps, plan)
    record = pruned.meta[keys.RECORD]
    log.info("rewrote the graph: %d of %d channel atoms removed", int(removed.sum()), a.deps.num_atoms)
    if verify and a.tree is None:  # a Hugging Face result is checked against the pruned graph in a.result
        _verified(record, verify_pass(a.gm, pruned, a.deps, removed, a.inputs))
    if compensation is not None:
        if a.tree is not None:
            raise ArgumentError(f"compensate=True: {type(a.tree).__name__} was captured by running its ops (its report says so), "
                                "and such a result keeps its modules' own biases; pass compensate=False")
        record["compensated"] = compensate(a.gm, a.deps, removed, pruned, compensation)
        log.info("compensated the removed channels' means in the biases of %d layers", len(record["compensated"]))
    result = a.result(pruned)
    if verify and a.tree is not None:
        _verified(record, verify_tree(a.gm, result, a.deps, removed, a.inputs))
    record["report"] = annotate(a.gm, pruned, a.deps, removed, a.flops, a.modules).to_dict()
    record["plan"] = plan.to_dict()
    record.update(provenance(a.deps, a.inputs))
    result.meta[keys.RECORD] = record
    return result


def _verified(record: dict[str, Any], check: Any) -> None:
    record["verified"] = {"max_abs_error": check.max_abs_error, "tolerance": check.tolerance}
    log.info("verified: max error %.3g (tolerance %.3g)", check.max_abs_error, check.tolerance)


def apply_checked_plan(a: Analysis, plan: Plan | dict[int, Sequence[int]], verify: bool) -> nn.Module:
    """``build_result`` by an explicit plan (``prune``, ``apply_plan``), once each group's kept positions are checked."""
    plan = Plan({int(k): _positions(k, v) for k, v in (plan.keep if isinstance(plan, Plan) else plan).items()})
    for gid, keep in plan.keep.items():
        if not 0 <= gid < len(a.deps.groups):
            raise PlanError(f"plan names group {gid}, but the model has groups 0..{len(a.deps.groups) - 1}")
        g = a.deps.groups[gid]
        keep = list(keep)
        if g.frozen and len(keep) != g.width:
            raise PlanError(f"group {gid} is frozen ({g.frozen[0]}); it must keep all {g.width} channels")
        if not keep or len(set(keep)) != len(keep) or min(keep) < 0 or max(keep) >= g.width:
            raise PlanError(f"group {gid} (width {g.width}, first member {g.members[0]}): keep must be distinct positions in 0..{g.width - 1}, at least one")
    return build_result(a, plan, verify)


def _positions(gid: Any, keep: Iterable[Any]) -> list[int]:
    """``keep`` as Python ints (numpy and tensor integers too); a ``PlanError`` for anything else."""
    try:
        return [operator.index(i) for i in keep]
    except TypeError:
        raise PlanError(f"group {gid}: kept positions must be integers, got {list(keep)!r:.200}") from None


def restrict_classes(model: Model, given: Inputs, keep_classes: Sequence[int], verify: bool) -> tuple[torch.fx.GraphModule, tuple[Any, ...]]:
    """``model`` with only the outputs ``keep_classes``, and the example inputs it was checked on."""
    a = analyze(model, given, free_output=True)
    pruned = build_result(a, class_plan(a.gm, a.deps, keep_classes), verify)
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


def restrict_classes_first(model: Model, given: Inputs, strategy: Strategy, keep_classes: Sequence[int] | None, verify: bool) -> Job:
    """Restrict classes first when asked (calibration then sees only their samples, renumbered)."""
    if keep_classes is None:
        return Job(model, given, strategy.chooser(), None, None)
    model, given = restrict_classes(model, given, keep_classes, verify)
    if strategy.calibration is not None:
        strategy = replace(strategy, calibration=ClassSubset(strategy.calibration, list(keep_classes)))
    return Job(model, given, strategy.chooser(), [int(c) for c in keep_classes], Report.from_dict(model.meta[keys.RECORD]["report"]))


def fill_record(job: Job, result: torch.fx.GraphModule, report: Report, extra: dict[str, Any] | None = None) -> torch.fx.GraphModule:
    """Record on ``result`` the report from the model as given (``report`` joined after the class
    restriction's), the strategy and the kept classes."""
    record = result.meta[keys.RECORD]
    record["report"] = (report if job.before is None else job.before.then(report)).to_dict()
    record["strategy"] = {**job.chooser.describe(), **(extra or {})}
    if job.keep_classes is not None:
        record["classes"] = job.keep_classes
    return result
