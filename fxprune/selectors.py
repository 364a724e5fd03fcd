"""Selectors: which atoms of each group matter most.

A selector has one job: score every atom of every prunable group (higher = keep). How many atoms each
group loses is decided once, by the budget logic in ``passes/select.py``, never by a selector. Any object
with a ``scores(graph, gm)`` method of the same signature can be passed as ``selector=``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.fx

from .errors import ArgumentError
from .graph import DependencyGraph

__all__ = ["Selector", "Uniform", "L1", "get_selector"]


@runtime_checkable
class Selector(Protocol):
    def scores(self, graph: DependencyGraph, gm: torch.fx.GraphModule) -> dict[int, torch.Tensor]:
        """Map each prunable group id to one score per atom (length ``group.width``)."""
        ...


class Uniform:
    """No ranking: every group keeps its first atoms, in channel order."""

    name = "uniform"

    def scores(self, graph: DependencyGraph, gm: torch.fx.GraphModule) -> dict[int, torch.Tensor]:
        return {g.id: -torch.arange(g.width, dtype=torch.float64) for g in graph.prunable_groups}


class L1:
    """L1 norm of the weights that produce each atom (output slices of conv/linear weights).

    Groups with no producing weight (a parameter used element-wise) fall back to all their members.
    """

    name = "l1"

    def scores(self, graph: DependencyGraph, gm: torch.fx.GraphModule) -> dict[int, torch.Tensor]:
        state = {**dict(gm.named_parameters()), **dict(gm.named_buffers())}
        out = {}
        for g in graph.prunable_groups:
            members = [m for m in g.members if m.role == "out"] or list(g.members)
            total = torch.zeros(graph.num_atoms, dtype=torch.float64)
            for m in members:
                t = state[m.name].detach().to(torch.float64)
                norms = t.abs().movedim(m.dim, 0).reshape(t.shape[m.dim], -1).sum(1)
                total.index_add_(0, graph.member_atoms[(m.name, m.dim)], norms)
            out[g.id] = total[g.atoms]
        return out


_BY_NAME: dict[str, type] = {"uniform": Uniform, "l1": L1}


def get_selector(selector: str | Selector) -> Selector:
    if isinstance(selector, str):
        if selector not in _BY_NAME:
            raise ArgumentError(f"unknown selector {selector!r}; choose one of {sorted(_BY_NAME)} or pass an object with a scores(graph, gm) method")
        return _BY_NAME[selector]()
    if not isinstance(selector, Selector):
        raise ArgumentError(f"selector {selector!r} has no scores(graph, gm) method")
    return selector
