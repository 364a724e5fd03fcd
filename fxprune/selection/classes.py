"""classes: the plan that keeps only some classes, i.e. some channels of the model's output.

Class-specific pruning starts by dropping the other classes' rows from the final classifier (a linear
layer, or a 1x1 conv for segmentation). The DependencyGraph must come from ``couple(..., free_output=True)``
so that the output's channels are not frozen. Classes lie along dim 1 of the model's single output
tensor, one channel atom per class; every group keeps all its atoms except the dropped classes'.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx

from ..errors import ArgumentError
from ..core.groups import DependencyGraph, Plan

__all__ = ["class_plan"]


def class_plan(gm: torch.fx.GraphModule, deps: DependencyGraph, keep_classes: Sequence[int]) -> Plan:
    """Plan that keeps the output channels ``keep_classes`` (in that order on the output) and all else."""
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    entry = deps.tensor_atoms.get(out.name) if isinstance(out, torch.fx.Node) else None
    if entry is None or entry[0] != 1:
        raise ArgumentError("keep_classes= needs a model that returns one tensor with the classes along dim 1 (logits)")
    ids = entry[1]
    classes = ids.numel()
    keep = [int(c) for c in keep_classes]
    if not keep or len(set(keep)) != len(keep) or min(keep) < 0 or max(keep) >= classes:
        raise ArgumentError(f"keep_classes= must be distinct class indices in 0..{classes - 1}, at least one; got {list(keep_classes)}")
    if keep != sorted(keep):
        raise ArgumentError(f"keep_classes= must be sorted (output i of the pruned model is the i-th kept class); got {keep}")
    if bool((ids < 0).any()) or ids.unique().numel() != classes:
        raise ArgumentError(f"the output {out.name}'s classes are not separate channels (they are produced jointly), so none can be dropped")
    dropped = torch.ones(classes, dtype=torch.bool)
    dropped[keep] = False
    plan: dict[int, list[int]] = {}
    for gid in deps.atom_group[ids[dropped]].unique().tolist():
        g = deps.groups[gid]
        if g.frozen:
            raise ArgumentError(f"the output {out.name}'s classes cannot be dropped: their channels are frozen ({g.frozen[0]})")
        plan[gid] = (~torch.isin(g.atoms, ids[dropped])).nonzero().flatten().tolist()
    return Plan(plan)
