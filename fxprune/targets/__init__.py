"""Reaching a target: the one home of "make this model cost at most that".

``reach`` serves every target ``compile`` takes: a FLOPs budget (``target_gflops=``, ``ratio=``),
met by the selection pass with the width rule (``multiples``), and a measured latency (``speedup=``,
``target_latency_ms=``), met by timing candidates against the original (``latency``). It decides
``round_to="auto"`` first, falls back to finer multiples when the chosen one cannot reach the target,
and returns the rewritten, verified result with its report's notes and latency record.
"""

from __future__ import annotations

from typing import Any

import torch.fx
from torch import nn

from ..core import metakeys as keys
from ..core.groups import Plan
from ..errors import TargetUnreachableError
from ..latency.timing import threads as using_threads
from ..pipeline import Analysis, build_result
from ..selection.strategy import Chooser
from . import latency
from .multiples import fallback_note, finer, measure_round_to, multiple_reaching, within
from .target import NOISE_POLICIES, Target

__all__ = ["reach", "Target", "NOISE_POLICIES", "measure_round_to", "multiple_reaching", "fallback_note"]


def reach(a: Analysis, chooser: Chooser, target: Target, seed: int, verify: bool, threads: int | None = None) -> tuple[nn.Module, Chooser]:
    """The verified result of ``target`` on ``a`` and the chooser that reached it: ``chooser`` with its
    multiple decided, or under ``round_to="auto"`` a finer one when its own does not reach the target
    (``multiples.within`` for a FLOPs target; a latency target, whose every try is timed, falls back to 1
    at once). A latency target is measured at ``threads`` threads (None: torch's count)."""
    if not target.measured:
        decided = measure_round_to(a, chooser, timed=False)
        used, plan = within(a, decided, target.macs(a.flops.total), seed)
        return _finish(a, decided, used, target, verify, plan, None, None), used
    with using_threads(threads):
        checked = latency.check_machine(a, target)  # before any timing: none is kept from a machine found noisy
        decided = measure_round_to(a, chooser, timed=True, cache=checked[1], total_ms=checked[2].original.median_ms)
        finest = finer(decided)[-1]
        try:
            return _finish(a, decided, decided, target, verify, *latency.measured(a, decided, target, seed, checked)), decided
        except TargetUnreachableError:
            if finest is decided:
                raise
        return _finish(a, decided, finest, target, verify, *latency.measured(a, finest, target, seed, checked)), finest


def _finish(a: Analysis, chooser: Chooser, used: Chooser, target: Target, verify: bool, plan: Plan,
            rewritten: torch.fx.GraphModule | None, measured: dict[str, Any] | None) -> nn.Module:
    """The result of ``plan``, its report's notes (a fallback to a finer multiple, the latency search's) and latency record."""
    s = used.strategy
    pruned = build_result(a, plan, verify, rewritten, s.calibration if s.compensate else None)
    record = pruned.meta[keys.RECORD]["report"]
    note = fallback_note(chooser, used, target.describe())
    record["notes"].extend([note] if note else [])
    if measured is not None:
        record["notes"].extend(measured.pop("notes"))
        record["latency"] = measured
    return pruned
