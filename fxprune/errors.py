"""fxprune's exception types.

Every error a user can trigger is one of these, with a message that names the node or module at fault
and says what to do about it.
"""

from __future__ import annotations

__all__ = [
    "FxPruneError",
    "ArgumentError",
    "TraceError",
    "ShapeError",
    "PlanError",
    "TargetUnreachableError",
    "MeasurementError",
    "VerificationError",
    "ArchiveError",
]


class FxPruneError(Exception):
    """Base class of every fxprune error."""


class ArgumentError(FxPruneError, ValueError):
    """A public function was called with arguments that cannot work together."""


class TraceError(FxPruneError):
    """The model could not be captured as a torch.fx graph."""


class ShapeError(FxPruneError):
    """Running the captured graph on the example inputs failed."""


class PlanError(FxPruneError):
    """A pruning plan does not fit the model's dependency groups."""


class TargetUnreachableError(FxPruneError):
    """The FLOPs or latency target is below what the prunable groups can reach. ``smallest_gflops``: the
    fewest GFLOPs reachable (FLOPs targets); ``best_speedup``: the best measured speed-up (latency targets)."""

    def __init__(self, message: str, smallest_gflops: float | None = None, best_speedup: float | None = None) -> None:
        super().__init__(message)
        self.smallest_gflops = smallest_gflops
        self.best_speedup = best_speedup


class MeasurementError(FxPruneError):
    """The machine was too noisy to tell whether a result meets a latency target. ``interval``: the best
    result's speed-up interval; ``noise``: how much the original timed against itself varied."""

    def __init__(self, message: str, interval: tuple[float, float] | None = None, noise: float | None = None) -> None:
        super().__init__(message)
        self.interval = interval
        self.noise = noise


class VerificationError(FxPruneError):
    """The pruned model does not compute what the plan says it should."""


class ArchiveError(FxPruneError):
    """An fxprune archive cannot be written, or a file given to load/apply_plan is not an intact one."""
