"""The pipeline, composed once: capture -> shapes -> couple -> select -> rewrite -> verify -> annotate.

``compile``, ``prune``, ``keep_only_classes``, ``prune_iteratively``, ``apply_plan``, the command line
and the torch.compile backend all go through these functions; none of them calls a pass directly.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import Field, dataclass, field, fields, replace
from typing import Any

import torch
import torch.distributed as dist
import torch.fx
from torch import nn

from .latency import costmodel
from .core import metakeys as keys
from .errors import ArgumentError, PlanError, ShapeError, TargetUnreachableError, VerificationError
from .core.flops import FlopModel, total_macs
from .core.graph import DependencyGraph, Plan
from .core.masks import removed_mask
from .passes.annotate import annotate
from .passes.capture import capture
from .passes.classes import class_plan
from .passes.couple import couple
from .passes.rewrite import rewrite
from .passes.select import CostModel, Tie, select
from .passes.shapes import propagate_shapes
from .passes.transplant import transplant
from .passes.hfconfig import config_ties, probe
from .passes.hfmodel import hf_model
from .passes.verify import verify as verify_pass
from .passes.verify import verify_same, verify_tree
from .archive.record import provenance
from .report import Report
from .selection.stats import ClassSubset
from .selection.strategy import Chooser, Strategy
from .latency.cache import TimingCache
from .latency.timing import Setting

__all__ = ["DEFAULT_INPUT_SHAPE", "Inputs", "Model", "Analysis", "Target", "Job", "example_inputs", "check_model", "analyze",
           "measure_round_to", "finer", "close", "reachable", "within", "CLOSE", "fallback_note", "select_plan", "rewrite_verify_record",
           "apply_checked_plan", "restrict_classes", "restrict_classes_first", "record_run", "NOISE_POLICIES"]

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
    beyond_config: str = ""
    """Why the last plan prunes past what a Hugging Face model's config can describe (empty if it does not)."""

    @property
    def tree(self) -> nn.Module | None:
        """The module tree whose one run ``gm`` records (an ops-run capture), else None."""
        return self.gm.meta.get(keys.TREE)

    @functools.cached_property
    def ties(self) -> list[Tie]:
        """Groups whose widths a Hugging Face model's config describes only together (passes/hfconfig.py);
        none for other models."""
        hf = self.gm.meta.get(keys.HF)
        p = probe(hf) if hf is not None else None
        return [] if p is None else config_ties(p, self.graph)

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
        model, why = hf_model(hf, pruned)
        why = self.beyond_config or why
        if model is not None:  # its own forward must give the pruned graph's outputs
            try:
                verify_same(pruned, model, self.inputs)
            except VerificationError as exc:
                model, why = None, (f"{type(hf).__name__} built from the solved config computes other outputs than the pruned graph "
                                    f"({str(exc).split(':')[0]}): it reads a config width as a value (Gemma, for one, scales its embeddings "
                                    "by sqrt(hidden_size))")
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
    try:
        propagate_shapes(gm, inputs)
    except ShapeError as exc:
        if gm.meta[keys.CAPTURE] != "torch.fx.symbolic_trace":
            raise
        try:  # a traced graph that cannot run: fall back to torch.export
            gm = capture(model, inputs, untraceable=exc)
            propagate_shapes(gm, inputs)
        except Exception:
            raise exc from None
    level = logging.INFO if announce else logging.DEBUG
    log.log(level, "captured %d graph nodes with %s", len(gm.graph.nodes), gm.meta[keys.CAPTURE])
    graph = couple(gm, ignore, free_output)
    total = total_macs(gm)
    log.log(level, "%d channel groups, %d prunable; %.4g GFLOPs", len(graph.groups), len(graph.prunable_groups), 2 * total / 1e9)
    return Analysis(gm, graph, FlopModel(graph, total), inputs)


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


NOISE_POLICIES = ("raise", "warn")
"""What a latency target does when the machine is too noisy to decide: raise ``MeasurementError``, or
return the best undecided result with a warning that gives its interval."""


@dataclass(frozen=True)
class Target:
    """What the result must cost: exactly one of ``gflops`` (of the result), ``ratio`` (of FLOPs removed),
    ``speedup`` (measured latency at most the original's divided by it) or ``latency_ms`` (measured)."""

    gflops: float | None = field(default=None, metadata={"keyword": "target_gflops", "help": "GFLOPs of the result (FLOPs = 2 x MACs)"})
    ratio: float | None = field(default=None, metadata={"keyword": "ratio", "help": "fraction of FLOPs to remove"})
    speedup: float | None = field(default=None, metadata={"keyword": "speedup", "measured": True, "metavar": "S",
                                                          "help": "measured latency at most the original's / S (on this machine)"})
    latency_ms: float | None = field(default=None, metadata={"keyword": "target_latency_ms", "measured": True, "metavar": "T",
                                                             "help": "measured latency at most T milliseconds"})
    on_noise: str = "raise"

    @classmethod
    def keywords(cls, measured: bool | None = None) -> dict[str, Field[Any]]:
        """The target keywords (``target_gflops``, ``ratio``, ``speedup``, ``target_latency_ms``) and their
        fields: the one list that ``compile``, ``prune_iteratively``, the command line and the backend use;
        ``measured``: only the latency targets (True) or only the FLOPs ones (False)."""
        return {f.metadata["keyword"]: f for f in fields(cls) if "keyword" in f.metadata
                and (measured is None or f.metadata.get("measured", False) == measured)}

    @classmethod
    def of(cls, on_noise: str = "raise", **keywords: float | None) -> Target:
        """The target given by keyword (see ``keywords``)."""
        return cls(**{f.name: keywords.get(k) for k, f in cls.keywords().items()}, on_noise=on_noise)

    def __post_init__(self) -> None:
        if self.on_noise not in NOISE_POLICIES:
            raise ArgumentError(f"on_noise must be one of {', '.join(NOISE_POLICIES)}, got {self.on_noise!r}")
        given = [v for f in self.keywords().values() if (v := getattr(self, f.name)) is not None]
        if len(given) != 1:
            raise ArgumentError("give exactly one of " + ", ".join(f"{k}= ({f.metadata['help']})" for k, f in self.keywords().items()))
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise ArgumentError(f"ratio must be in [0, 1), got {self.ratio}")
        for name, value in (("target_gflops", self.gflops), ("target_latency_ms", self.latency_ms)):
            if value is not None and not value > 0:
                raise ArgumentError(f"{name} must be positive, got {value}")
        if self.speedup is not None and not self.speedup >= 1.0:
            raise ArgumentError(f"speedup must be at least 1 (the original's latency divided by the result's), got {self.speedup}")

    @property
    def measured(self) -> bool:
        """A latency target: the result is measured until it holds."""
        return any(getattr(self, f.name) is not None for f in self.keywords(measured=True).values())

    def macs(self, total: int) -> float:
        """The MACs budget for a model of ``total`` MACs (FLOPs = 2 x MACs)."""
        return self.gflops * 1e9 / 2 if self.gflops is not None else (1.0 - self.ratio) * total

    def describe(self) -> str:
        """The target as the user gave it, e.g. ``ratio=0.5``."""
        return next(f"{k}={getattr(self, f.name):g}" for k, f in self.keywords().items() if getattr(self, f.name) is not None)


def measure_round_to(a: Analysis, chooser: Chooser, timed: bool) -> Chooser:
    """``chooser`` with ``round_to="auto"`` made a number: for a latency target (``timed``) the multiple
    measured fastest on ``a`` (``costmodel.fast_multiple``), for a FLOPs target the one decided without
    the clock (``costmodel.steady_multiple``), so that a FLOPs target gives the same plan at any moment."""
    if chooser.strategy.round_to != "auto":
        return chooser
    if timed:
        multiple = costmodel.fast_multiple(a.gm, a.graph, Setting.of(a.gm, a.inputs), TimingCache())
        log.info("round_to='auto': widths are multiples of %d, measured fastest on this device", multiple)
    else:
        multiple = costmodel.steady_multiple(a.gm, a.graph)
    return replace(chooser, strategy=replace(chooser.strategy, round_to=multiple), measured=True)


def finer(chooser: Chooser) -> list[Chooser]:
    """``chooser`` and, when its multiple was measured (``round_to="auto"``), the same with every finer
    multiple down to 1: what "auto" falls back to when its multiple leaves a target out of reach, so
    that it never reaches less than ``round_to=1`` would."""
    if not chooser.measured:
        return [chooser]
    out, r = [chooser], chooser.strategy.round_to
    while r > 1:
        r //= 2
        out.append(replace(chooser, strategy=replace(chooser.strategy, round_to=r)))
    return out


CLOSE = 0.03
"""Under ``round_to="auto"``, a FLOPs target whose plan lands further than this below its budget falls
back to a finer multiple (at ``round_to=1`` plans land within it)."""


def close(a: Analysis, plan: Plan, macs: float) -> bool:
    """Whether ``plan`` keeps at least ``1 - CLOSE`` of the ``macs`` budget."""
    return a.flops.macs(removed_mask(a.graph, plan)) >= (1 - CLOSE) * macs


def reachable(a: Analysis, chooser: Chooser, macs: float) -> Chooser:
    """The first of ``finer(chooser)`` whose width rule gets the model down to ``macs``, within ``CLOSE``
    (the last if none does); the width rule, not the scores, decides that, so flat scores are used."""
    options = finer(chooser)
    flat = {g.id: torch.zeros(g.width) for g in a.graph.prunable_groups}
    for used in options[:-1]:
        try:
            if close(a, select_plan(a, used, macs, flat), macs):
                return used
        except TargetUnreachableError:
            continue
    return options[-1]


def within(a: Analysis, chooser: Chooser, macs: float, seed: int) -> tuple[Chooser, Plan]:
    """The plan of a FLOPs budget of ``macs`` and the chooser that made it: ``chooser``'s own multiple when
    its plan keeps within ``CLOSE`` of the budget, else the first of ``finer(chooser)`` that does (the last
    if none). The scores are computed once, unless the selector reads the width rule."""
    *options, last = finer(chooser)
    scores = chooser.scores(a.graph, a.gm, seed, cost=a.flops)
    rescore = getattr(chooser.selector, "uses_width_rule", False)
    for used in options:
        scores = used.scores(a.graph, a.gm, seed, cost=a.flops) if rescore and used is not chooser else scores
        try:
            plan = select_plan(a, used, macs, scores)
        except TargetUnreachableError:
            continue
        if close(a, plan, macs):
            return used, plan
    scores = last.scores(a.graph, a.gm, seed, cost=a.flops) if rescore and options else scores
    return last, select_plan(a, last, macs, scores)


def fallback_note(tried: Chooser, used: Chooser, target: str) -> str | None:
    """The report's note when "auto" fell back from ``tried``'s multiple to ``used``'s."""
    if tried is used:
        return None
    note = (f"round_to='auto': multiples of {tried.strategy.round_to} (measured fastest here) do not reach {target} "
            f"(a FLOPs target: within {CLOSE:.0%}); widths are multiples of {used.strategy.round_to} instead")
    log.warning(note)
    return note


def select_plan(a: Analysis, chooser: Chooser, target: float, scores: dict[int, torch.Tensor], cost: CostModel | None = None) -> Plan:
    """The plan whose ``cost`` (default: ``a.flops``, in MACs) fits ``target`` given the selector's
    ``scores``; under torch.distributed, rank 0's plan, on every rank."""
    ties = a.ties if chooser.rule.equal_widths else []
    try:
        plan = select(a.graph, cost or a.flops, target, scores, mode=chooser.mode, rule=chooser.rule, comparable=chooser.comparable, ties=ties)
        a.beyond_config = ""
    except TargetUnreachableError as exc:
        if not ties:
            raise
        plan = select(a.graph, cost or a.flops, target, scores, mode=chooser.mode, rule=chooser.rule, comparable=chooser.comparable)
        a.beyond_config = (f"the widths that {type(a.gm.meta[keys.HF]).__name__}'s config can describe (in proportion, whole heads) "
                           f"do not reach the target ({str(exc).split(':')[0]}), so the plan prunes past them")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        shared = [plan.to_json()]
        dist.broadcast_object_list(shared, src=0)
        plan = Plan.from_json(shared[0])
    return plan


def rewrite_verify_record(a: Analysis, plan: Plan, verify: bool, pruned: torch.fx.GraphModule | None = None) -> nn.Module:
    """Rewrite ``a`` as ``plan`` says (unless ``pruned`` is that rewrite already), verify the result
    (when asked) and record the report, plan and provenance in its ``meta``."""
    pruned = rewrite(a.gm, a.graph, plan) if pruned is None else pruned
    result = a.result(pruned)
    removed = removed_mask(a.graph, plan)
    record = pruned.meta[keys.RECORD]
    log.info("rewrote the graph: %d of %d channel atoms removed", int(removed.sum()), a.graph.num_atoms)
    if verify:
        if a.tree is None:
            check = verify_pass(a.gm, pruned, a.graph, removed, a.inputs)  # a Hugging Face result was checked against it
        else:
            check = verify_tree(a.gm, result, a.graph, removed, a.inputs)
        record["verified"] = {"max_abs_error": check.max_abs_error, "tolerance": check.tolerance}
        log.info("verified: max error %.3g (tolerance %.3g)", check.max_abs_error, check.tolerance)
    record["report"] = annotate(a.gm, pruned, a.graph, removed, a.flops).to_dict()
    record["plan"] = json.loads(plan.to_json())
    record.update(provenance(a.graph, a.inputs))
    result.meta[keys.RECORD] = record
    return result


def apply_checked_plan(a: Analysis, plan: Plan | dict[int, Sequence[int]], verify: bool) -> nn.Module:
    """``rewrite_verify_record`` by an explicit plan (``prune``, ``apply_plan``), once each group's kept positions are checked."""
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
    return rewrite_verify_record(a, plan, verify)


def restrict_classes(model: Model, given: Inputs, keep_classes: Sequence[int], verify: bool) -> tuple[torch.fx.GraphModule, tuple[Any, ...]]:
    """``model`` with only the outputs ``keep_classes``, and the example inputs it was checked on."""
    a = analyze(model, given, free_output=True)
    pruned = rewrite_verify_record(a, class_plan(a.gm, a.graph, keep_classes), verify)
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


def record_run(job: Job, result: torch.fx.GraphModule, report: Report, extra: dict[str, Any] | None = None) -> torch.fx.GraphModule:
    """Record on ``result`` the report from the model as given (``report`` joined after the class
    restriction's), the strategy and the kept classes."""
    record = result.meta[keys.RECORD]
    record["report"] = (report if job.before is None else job.before.then(report)).to_dict()
    record["strategy"] = {**job.chooser.describe(), **(extra or {})}
    if job.keep_classes is not None:
        record["classes"] = job.keep_classes
    return result
