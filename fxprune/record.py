"""What a pruned model records about its origin, so that a saved plan can be checked and replayed.

Kept apart from ``serialize.py`` (which imports ``api``) so that ``api`` can import it without a cycle.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .errors import ArgumentError
from .graph import DependencyGraph

__all__ = ["plan_fingerprint", "input_specs", "inputs_from_specs", "provenance"]


def plan_fingerprint(graph: DependencyGraph) -> list[dict[str, Any]]:
    """Per group, in id order: its width and sorted member names (``"conv.weight[0]"``).

    Group ids and positions mean the same thing in two models exactly when this matches, so a plan
    saved with it can be refused, rather than misapplied, on another architecture.
    """
    return [{"width": g.width, "members": sorted(str(m) for m in g.members)} for g in graph.groups]


def input_specs(inputs: Sequence[Any]) -> list[dict[str, Any]]:
    """JSON-ready shape and dtype of each positional example input (tensors only)."""
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            raise ArgumentError(f"example input {i} is a {type(x).__name__}; saved models take tensor inputs only")
    return [{"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")} for x in inputs]


def inputs_from_specs(specs: Sequence[dict[str, Any]], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Seeded random tensors of recorded shapes and dtypes: example inputs when the caller gives none."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for spec in specs:
        dtype = getattr(torch, spec["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise ArgumentError(f"recorded input dtype {spec['dtype']!r} is not a torch dtype")
        out.append(torch.randn(spec["shape"], generator=gen).to(dtype))
    return tuple(out)


def provenance(graph: DependencyGraph, inputs: Sequence[Any]) -> dict[str, Any]:
    """The fields ``gm.meta["fxprune"]`` gains at compile time: the graph's fingerprint and, when every
    example input is a tensor, their specs (which ``save`` then needs no ``example_inputs=`` for)."""
    record: dict[str, Any] = {"fingerprint": plan_fingerprint(graph)}
    if all(isinstance(x, torch.Tensor) for x in inputs):
        record["inputs"] = input_specs(inputs)
    return record
