"""Record the decisions one run makes on its data, and hand them to a second run.

A detector decides on floating-point data: which anchors are the top k, which boxes NMS keeps, which
scores pass a threshold. Two runs that differ by float rounding alone (the pruned model and its masked
original) can decide a near-tie differently and then compare different boxes. ``Decisions`` records
every integer or boolean result that an op computes from floating-point inputs (indices, keeps,
masks) and, in a second run, returns the recorded ones in the same order, so both runs take the same
path; the floating-point results are always computed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import VerificationError

__all__ = ["Decisions"]


def _decides(inputs: list[Any], outputs: list[Any]) -> bool:
    """An op decides when it reads floating-point tensors and gives integer or boolean ones."""
    return (any(isinstance(t, torch.Tensor) and t.is_floating_point() for t in inputs)
            and any(isinstance(t, torch.Tensor) and not t.is_floating_point() for t in outputs))


class Decisions(TorchDispatchMode):
    """``with d.record(): model(x)`` then ``with d.replay(): other(x)``: see the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.taken: list[tuple[Any, list[Any]]] = []
        self.replaying = False
        self.at = 0

    @contextmanager
    def record(self) -> Iterator[None]:
        self.taken, self.replaying = [], False
        with self:
            yield

    @contextmanager
    def replay(self) -> Iterator[None]:
        self.at, self.replaying = 0, True
        with self:
            yield
        if self.at != len(self.taken):
            raise VerificationError(f"the second run made {self.at} of the first run's {len(self.taken)} decisions")

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        leaves, spec = tree_flatten(out)
        if not _decides(tree_flatten((args, kwargs))[0], leaves):
            return out
        if not self.replaying:
            self.taken.append((func, leaves))
            return out
        if self.at >= len(self.taken) or self.taken[self.at][0] is not func:
            raise VerificationError(f"the second run took another path: decision {self.at} is {func}, not "
                                    f"{self.taken[self.at][0] if self.at < len(self.taken) else 'the end of the run'}")
        recorded = self.taken[self.at][1]
        self.at += 1
        mixed = [r if isinstance(r, torch.Tensor) and not r.is_floating_point() else v for v, r in zip(leaves, recorded)]
        return tree_unflatten(mixed, spec)
