"""Target: what a result must cost, as the user asked for it (FLOPs or measured latency)."""

from __future__ import annotations

from dataclasses import Field, dataclass, field, fields
from typing import Any

from ..errors import ArgumentError

__all__ = ["Target", "NOISE_POLICIES"]


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
