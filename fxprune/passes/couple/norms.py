"""Rules for LayerNorm and GroupNorm: statistics over channels.

Pruning there is allowed, but the pruned layer computes its statistics over the kept channels only,
so its output changes: the node gets a note for the user and is listed in
``DependencyGraph.masked_norms`` for the verification oracle. GroupNorm merges position j of every
group, so that every group loses the same positions; with one group per channel it is per-channel
and its group count follows the pruned width.
"""

from __future__ import annotations

from typing import Any

import torch.fx
import torch.nn.functional as F
from torch import nn

from ...core.fxutil import arg
from ...core.groups import Family, Patch, PatchKind, Role
from .labels import Labels, Param
from .state import State, Unsupported, family, handles, owner


@handles(nn.LayerNorm)
@family(Family.NORM)
def layer_norm_module(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Labels:
    mod = s.modules[node.target]
    return layer_norm(s, node, len(mod.normalized_shape), [f"{node.target}.{n}" for n, _ in mod.named_parameters(recurse=False)])


@handles(F.layer_norm)
@family(Family.NORM)
def layer_norm_function(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Labels:
    shape = arg(node.args, node.kwargs, 1, "normalized_shape")
    if not isinstance(shape, (tuple, list)):
        raise Unsupported(f"layer_norm at node {node.name} computes its normalized_shape")
    return layer_norm(s, node, len(shape), affine(args, kwargs))


@handles(nn.GroupNorm)
@family(Family.NORM)
def group_norm_module(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Labels:
    mod = s.modules[node.target]
    return group_norm(s, node, mod.num_groups, [f"{node.target}.{n}" for n, _ in mod.named_parameters(recurse=False)])


@handles(F.group_norm)
@family(Family.NORM)
def group_norm_function(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Labels:
    groups = arg(node.args, node.kwargs, 1, "num_groups")
    if not isinstance(groups, int):
        raise Unsupported(f"group_norm at node {node.name} computes its group count")
    return group_norm(s, node, groups, affine(args, kwargs))


def affine(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
    """Names of the weight and bias parameters passed to a functional norm."""
    found = [arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "bias")]
    return [p.name for p in found if isinstance(p, Param)]


def layer_norm(s: State, node: torch.fx.Node, k: int, params: list[str]) -> Labels:
    """LayerNorm over the last ``k`` dims; only over the channel dim alone can it be pruned."""
    src, x = s.input_of(node)
    who = owner(node)
    out = x.with_shape(s.shape(node))
    nd = len(x.shape)
    if x.dim is None or x.dim < nd - k or x.shape[x.dim] == 1:
        return out
    if k != 1:
        s.freeze(x, f"{who} normalizes over several dims including the channel dim")
        return out
    s.mask_norm(node, f"{who} normalizes over pruned channels: statistics change with pruning")
    for name in params:
        s.bind(name, 0, x.ids, who, Role.PARAM)
    if node.op == "call_module":
        s.patches.append(Patch(PatchKind.ATTR, who, src.name, x.dim, field="normalized_shape", as_tuple=True))
    else:
        path = ("args", 1) if len(node.args) > 1 else ("kwargs", "normalized_shape")
        s.patches.append(Patch(PatchKind.ARG, node.name, src.name, x.dim, path=path, as_tuple=True))
    return out


def group_norm(s: State, node: torch.fx.Node, groups: int, params: list[str]) -> Labels:
    src, x = s.input_of(node)
    who = owner(node)
    out = x.with_shape(s.shape(node))
    if x.dim != 1 or x.shape[1] == 1:
        if x.dim is not None:
            s.freeze(x, f"{who} expects channels on dim 1")
        return out
    c = x.shape[1]
    for name in params:
        s.bind(name, 0, x.ids, who, Role.PARAM)
    if node.op == "call_module":
        s.patches.append(Patch(PatchKind.ATTR, who, src.name, 1, field="num_channels"))
    if groups == c:
        if node.op == "call_module":
            s.patches.append(Patch(PatchKind.ATTR, who, src.name, 1, field="num_groups"))
        else:
            path = ("args", 1) if len(node.args) > 1 else ("kwargs", "num_groups")
            s.patches.append(Patch(PatchKind.ARG, node.name, src.name, 1, path=path))
        return out
    if groups > 1:
        s.uf.union_pairs(x.ids, x.ids[: c // groups].repeat(groups))
    s.mask_norm(node, f"{who} normalizes over groups of pruned channels: statistics change with pruning")
    return out
