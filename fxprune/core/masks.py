"""Which channel atoms a plan removes, and which positions of a tensor or parameter dim it keeps."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch

from .groups import NEVER_REMOVED, DependencyGraph, Plan

__all__ = ["removed_mask", "kept_mask", "kept_masks", "owned_cat"]


def removed_mask(deps: DependencyGraph, plan: Plan) -> torch.Tensor:
    """Boolean mask over atoms: True where the plan drops the atom."""
    removed = torch.zeros(deps.num_atoms, dtype=torch.bool)
    for gid, keep in plan.keep.items():
        atoms = deps.groups[gid].atoms
        drop = torch.ones(atoms.numel(), dtype=torch.bool)
        drop[list(keep)] = False
        removed[atoms[drop]] = True
    return removed


def kept_mask(removed: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:
    """For positions whose atoms are ``atoms``: True where the position stays (``NEVER_REMOVED`` always does)."""
    never = atoms == NEVER_REMOVED
    return never | ~removed[atoms.masked_fill(never, 0)]


def kept_masks(removed: torch.Tensor, atoms: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
    """``kept_mask`` of every entry of ``atoms`` (1-D atom tensors), computed at once: a graph has hundreds."""
    keys = list(atoms)
    if not keys:
        return {}
    kept = kept_mask(removed, torch.cat([atoms[k] for k in keys]))
    return dict(zip(keys, torch.split(kept, [atoms[k].numel() for k in keys])))


def owned_cat(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.cat`` of 1-D ``tensors`` and, for each element, the index of the tensor it came from: how the
    passes work over every member or tensor of a graph at once."""
    owner = torch.repeat_interleave(torch.arange(len(tensors)), torch.tensor([t.numel() for t in tensors], dtype=torch.long))
    return owner, torch.cat(list(tensors))
