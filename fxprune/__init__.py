"""fxprune: structured channel pruning as a torch.fx compiler pass.

    import fxprune, torchvision
    small = fxprune.compile(torchvision.models.resnet50(), target_gflops=2.0)
    print(fxprune.report(small))
"""

from .api import DEFAULT_INPUT_SHAPE, analyze, compile, count_flops, drop_layers, keep_only_classes, prune, report
from .errors import (
    ArchiveError,
    ArgumentError,
    FxPruneError,
    MeasurementError,
    PlanError,
    ShapeError,
    TargetUnreachableError,
    TraceError,
    VerificationError,
)
from .heal import distillation
from .iterate import History, Step, prune_iteratively
from .core.groups import DependencyGraph, Group, Member, Plan
from .core.provenance import plan_fingerprint
from .report import Report
from .selection.protocol import Selector
from .selection.selectors import SELECTORS
from .archive.serialize import apply_plan, load, save
from .selection.strategy import Strategy
from .latency.timing import Latency, measure_latency

__version__ = "0.1.0"

globals().update({cls.__name__: cls for cls in SELECTORS.values()})  # every selector class, from the one list

__all__ = [
    "compile", "analyze", "prune", "drop_layers", "distillation", "keep_only_classes", "prune_iteratively", "History", "Step", "report",
    "count_flops", "DEFAULT_INPUT_SHAPE",
    "save", "load", "apply_plan", "plan_fingerprint", "Strategy",
    "measure_latency", "Latency",
    "DependencyGraph", "Group", "Member", "Plan", "Report", "Selector", "SELECTORS", *(cls.__name__ for cls in SELECTORS.values()),
    "FxPruneError", "ArgumentError", "TraceError", "ShapeError", "PlanError",
    "TargetUnreachableError", "MeasurementError", "VerificationError", "ArchiveError",
]
