"""What a pruned model records about its origin, so that a saved plan can be checked and replayed.

Below the pipeline, which records it on every result; ``archive/serialize.py`` checks it on load.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import ArgumentError
from .groups import DependencyGraph

__all__ = ["plan_fingerprint", "input_specs", "inputs_from_specs", "provenance"]


def plan_fingerprint(deps: DependencyGraph) -> list[dict[str, Any]]:
    """Per group, in id order: its width and sorted member names (``"conv.weight[0]"``).

    Group ids and positions mean the same thing in two models exactly when this matches, so a plan
    saved with it can be refused, rather than misapplied, on another architecture.
    """
    return [{"width": g.width, "members": sorted(str(m) for m in g.members)} for g in deps.groups]


def _spec(x: Any) -> dict[str, Any] | None:
    """A tensor's shape and dtype, ``{"list": [...]}`` for a list or tuple of tensors (a detector's images), else None."""
    if isinstance(x, torch.Tensor):
        return {"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")}
    if isinstance(x, (list, tuple)) and x and all(isinstance(t, torch.Tensor) for t in x):
        return {"list": [_spec(t) for t in x]}
    return None


def input_specs(inputs: Sequence[Any]) -> list[dict[str, Any]]:
    """JSON-ready shape and dtype of each positional example input (tensors, or lists of tensors)."""
    specs = [_spec(x) for x in inputs]
    for i, (x, spec) in enumerate(zip(inputs, specs)):
        if spec is None:
            raise ArgumentError(f"example input {i} is a {type(x).__name__}; saved models take tensors or lists of tensors only")
    return specs  # type: ignore[return-value]


def inputs_from_specs(specs: Sequence[dict[str, Any]], seed: int = 0) -> tuple[Any, ...]:
    """Seeded random tensors (and lists of them) of recorded shapes and dtypes: example inputs when the caller gives none."""
    gen = torch.Generator().manual_seed(seed)

    def build(spec: dict[str, Any]) -> Any:
        if "list" in spec:
            return [build(s) for s in spec["list"]]
        dtype = getattr(torch, spec["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise ArgumentError(f"recorded input dtype {spec['dtype']!r} is not a torch dtype")
        return torch.randn(spec["shape"], generator=gen).to(dtype)

    return tuple(build(spec) for spec in specs)


def provenance(deps: DependencyGraph, inputs: Sequence[Any]) -> dict[str, Any]:
    """The fields ``gm.meta["fxprune"]`` gains at compile time: the dependency groups' fingerprint and, when every
    example input is a tensor or a list of tensors, their specs (which ``save`` then needs no
    ``example_inputs=`` for)."""
    record: dict[str, Any] = {"fingerprint": plan_fingerprint(deps)}
    specs = [_spec(x) for x in inputs]
    if None not in specs:
        record["inputs"] = specs
    return record
