"""The selector protocol: an object with ``scores(graph, gm)`` that scores every atom of every prunable
group (higher = keep); see ``selectors`` for the rules every selector follows."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.fx

from ..core.groups import DependencyGraph

__all__ = ["Selector", "Scores"]

Scores = dict[int, torch.Tensor]


@runtime_checkable
class Selector(Protocol):
    def scores(self, deps: DependencyGraph, gm: torch.fx.GraphModule) -> Scores:
        """Map each prunable group id to one score per atom (length ``group.width``)."""
        ...
