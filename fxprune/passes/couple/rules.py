"""Rules for the graph's boundary and for ops that keep channels where they are.

* placeholder, get_attr, output: inputs and outputs keep their channels, parameters are read by name;
* element-wise (add, mul, activations, where ...): labels meeting at one position are merged;
* channel-wise (BatchNorm, PReLU, pooling, interpolation, padding): labels stay with their channel;
* softmax and reductions: fine along other dims, frozen over the channel dim;
* grad mode and autocast entered and left around a region: nothing to do;
* anything not in the dispatch table: unsupported, so the driver freezes it.

Every rule takes ``(state, node, args, kwargs)``, the args being the values of the node's arguments.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import TensorMetadata

from ...core import metakeys as keys
from ...core.fxutil import arg
from ...core.groups import Family, Patch, PatchKind, Role
from ...core.optable import (
    CHANNEL_PARAM_MODULES,
    CONTEXT,
    CREATE,
    ELEMENTWISE_FUNCS,
    ELEMENTWISE_METHODS,
    ELEMENTWISE_MODULES,
    FIRST_OPERAND_FUNCS,
    FIRST_OPERAND_METHODS,
    MEAN,
    REDUCTIONS,
    ROI_POOL,
    SOFTMAX,
    SPATIAL_FUNCS,
    SPATIAL_MODULES,
    UNPOOL_FUNCS,
    UNPOOL_MODULES,
    canonical,
)
from .labels import Labels, Param, compress
from .literals import channel_sources
from .state import State, Unsupported, family, handles, owner, target_name


def placeholder(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A model input: its channels come from outside, so no plan may remove them."""
    return s.frozen_like(node, f"model input {node.name}")


def get_attr(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A parameter or buffer, labelled by name when it is first used as data."""
    obj = operator.attrgetter(node.target)(s.gm)
    return Param(node.target, obj) if isinstance(obj, torch.Tensor) else obj


def output(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The model's outputs keep all their channels, unless the caller frees them (to drop classes)."""
    if not s.free_output:
        s.freeze(args[0], "model output")
    return args[0]


def unknown(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The rule of everything the dispatch table does not name."""
    mod = s.module(node)
    if mod is not None:
        raise Unsupported(f"module {node.target} ({type(mod).__name__}) is not understood")
    kind = "method" if node.op == "call_method" else "function"
    raise Unsupported(f"{kind} {target_name(node)} at node {node.name} is not understood")


@handles(CONTEXT)
def context(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Entering or leaving grad mode or autocast: no tensors pass."""
    return None


@handles(CREATE)
@family(Family.ELEMENTWISE)
def creates(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Labels:
    """``torch.zeros(size)``, ``x.new_zeros(size)`` and the like: a constant; ``x`` only lends its dtype
    and device."""
    sizes = node.args[1:] if node.op == "call_method" or keys.TENSOR_META in getattr(node.args[0], "meta", {}) else node.args
    if any(channel_sources(s, a) for a in (*sizes, *node.kwargs.values())):
        raise Unsupported(f"node {node.name} creates a tensor sized by a channel count")
    return Labels(s.shape(node), None, s.uf.fresh(1))


@handles(UNPOOL_MODULES, ELEMENTWISE_FUNCS, ELEMENTWISE_METHODS, UNPOOL_FUNCS, by_name=("stochastic_depth", "_add_shortcut"))
@family(Family.ELEMENTWISE)
def elementwise(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Labels:
    """An op applied position by position to all its tensor operands (add, mul, where ...)."""
    if not isinstance(node.meta.get(keys.TENSOR_META), TensorMetadata):
        raise Unsupported(f"node {node.name} returns positions, not values")  # torch.where(condition)
    return merge(s, node, [*args, *kwargs.values()])


@handles(ELEMENTWISE_MODULES, FIRST_OPERAND_FUNCS, FIRST_OPERAND_METHODS)
@family(Family.ELEMENTWISE)
def first_operand(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Labels:
    """An op whose output follows its first operand only (activations, ``contiguous``, ``zeros_like``)."""
    return merge(s, node, list(args[:1]))


def merge(s: State, node: torch.fx.Node, operands: list[Any]) -> Labels:
    """Merge the labels that meet at each position of ``node``'s output."""
    out_shape = s.shape(node)
    nd = len(out_shape)
    labs = [s.as_labels(v) for v in operands if isinstance(v, (Labels, Param))]
    if not labs:
        return s.frozen_like(node, f"node {node.name} creates a tensor")

    def aligned_size(lab: Labels, d: int) -> int:
        k = d - (nd - len(lab.shape))
        return lab.shape[k] if k >= 0 else 1

    def along(labs: list[Labels]) -> set[int]:
        return {lab.dim + nd - len(lab.shape) for lab in labs if lab.dim is not None and lab.shape[lab.dim] > 1}

    varying = along(labs)
    if len(varying) > 1:
        # A table of parameters or buffers read along positions that the channels do not vary along (a
        # rotary embedding's cos and sin, a per-head norm's weight, along head_dim, the heads being the
        # channels): those positions stay.
        table = [s.is_table(lab) for lab in labs]
        channels = [lab for lab, t in zip(labs, table) if not t]
        if len(along(channels)) == 1:
            s.freeze([lab for lab, t in zip(labs, table) if t], f"node {node.name} reads a table of parameters or buffers along "
                                                               "positions that are not channels")
            labs, varying = channels, along(channels)
    if len(varying) > 1:
        full = [s.full(lab) for lab in labs]
        full = [f.reshape([1] * (nd - f.dim()) + list(f.shape)).expand(out_shape) for f in full]
        for f in full[1:]:
            s.uf.union_pairs(full[0], f)
        return compress(s.uf, full[0])
    if not varying:
        for lab in labs[1:]:
            s.uf.union(int(labs[0].ids[0]), int(lab.ids[0]))
        return Labels(out_shape, None, labs[0].ids[:1])
    d = varying.pop()
    out = next(lab for lab in labs if lab.dim is not None and lab.dim + nd - len(lab.shape) == d)
    for lab in labs:
        if lab is out or aligned_size(lab, d) == 1:
            continue  # broadcast along the channel dim: not tied to any one channel
        if lab.ids.numel() == 1:  # one label over the whole channel dim: tied to every channel
            s.uf.union_pairs(lab.ids.expand_as(out.ids), out.ids)
        else:
            s.uf.union_pairs(lab.ids, out.ids)
    return Labels(out_shape, d, out.ids)


@handles(SPATIAL_MODULES, SPATIAL_FUNCS, ROI_POOL)
@family(Family.CHANNELWISE)
def spatial(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Labels:
    """Pooling, interpolation and padding modules and pooling functions; a max pool that also returns
    its indices gives them the channels of its values."""
    src, x = s.input_of(node)
    meta = node.meta.get(keys.TENSOR_META)
    if isinstance(meta, (tuple, list)) and not isinstance(meta, TensorMetadata):
        values = per_channel(s, node, src, x, {}, tuple(meta[0].shape))
        return values, values.with_shape(tuple(meta[1].shape))
    return per_channel(s, node, src, x, {})


@handles(CHANNEL_PARAM_MODULES)
@family(Family.CHANNELWISE)
def channel_params(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Labels:
    """BatchNorm, InstanceNorm and PReLU modules: their parameters and buffers hold one entry per channel."""
    mod = s.modules[node.target]
    tensors = [(n, t) for n, t in (*mod._parameters.items(), *mod._buffers.items()) if t is not None]  # named_*() walk the tree
    src, x = s.input_of(node)
    return per_channel(s, node, src, x, {f"{node.target}.{n}": t for n, t in tensors})


@handles(F.batch_norm, F.instance_norm)
@family(Family.CHANNELWISE)
def batch_norm(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Labels:
    """``F.batch_norm`` and ``F.instance_norm``: the statistics and affine tensors passed in."""
    names = ("running_mean", "running_var", "weight", "bias")
    found = [arg(args, kwargs, 1 + i, name) for i, name in enumerate(names)]
    src, x = s.input_of(node)
    return per_channel(s, node, src, x, {p.name: p.tensor for p in found if isinstance(p, Param)})


@handles(F.pad)
@family(Family.CHANNELWISE)
def pad(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Labels:
    """``F.pad`` of the trailing dims; padding the channel dim by anything but zero is unsupported."""
    src, x = s.input_of(node)
    widths = arg(args, kwargs, 1, "pad")
    if x.dim is not None and x.dim >= len(x.shape) - len(widths) // 2:
        k = 2 * (len(x.shape) - 1 - x.dim)
        if any(s.value(w) != 0 for w in widths[k:k + 2]):
            raise Unsupported(f"pad at node {node.name} pads the channel dim")
    return x.with_shape(s.shape(node))


def per_channel(s: State, node: torch.fx.Node, src: torch.fx.Node, x: Labels, params: dict[str, torch.Tensor],
                shape: tuple[int, ...] | None = None) -> Labels:
    """Labels stay with their channel on dim 1; ``params`` (name -> tensor) with one entry per channel follow."""
    who = owner(node)
    if x.dim not in (None, 1):
        s.freeze(x, f"{who} works per channel on dim 1, but channels vary along dim {x.dim} here")
        x = Labels(x.shape, None, x.ids[:1])
    if x.dim == 1:
        for name, t in params.items():
            if t.dim() == 1 and t.shape[0] == x.shape[1] and x.shape[1] > 1:
                s.bind(name, 0, x.ids, who, Role.PARAM)
        width = width_field(s.module(node))
        if width:
            s.patches.append(Patch(PatchKind.ATTR, who, src.name, 1, field=width))
    return x.with_shape(shape or s.shape(node))


def width_field(mod: nn.Module | None) -> str:
    """The attribute of a per-channel module that holds its channel count ("" when none must change)."""
    if isinstance(mod, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        return "num_features"
    if isinstance(mod, nn.PReLU) and mod.num_parameters > 1:
        return "num_parameters"
    return ""


@handles(nn.Softmax, nn.LogSoftmax, SOFTMAX)
@family(Family.ELEMENTWISE)
def softmax(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Labels:
    """Softmax: position-wise along other dims; over the channel dim every output reads every channel."""
    mod = s.module(node)
    x = s.labels(arg(args, kwargs, 0, "input"), node)
    dim = mod.dim if mod is not None else arg(args, kwargs, 1, "dim")
    if x.dim is not None and (dim is None or dim % len(x.shape) == x.dim):
        s.freeze(x, f"softmax over the channel dim at node {node.name}")
    return x.with_shape(s.shape(node))


@handles(REDUCTIONS)
@family(Family.REDUCTION)
def reduction(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Labels:
    """mean / sum / amax / amin: labels kept along the remaining dims, frozen when the channel dim goes,
    except for a mean over the channel dim alone: a per-position statistic, masked like LayerNorm's (in a
    graph, not in a module tree)."""
    x = s.labels(arg(args, kwargs, 0, "input"), node)
    return reduce(s, node, x, arg(args, kwargs, 1, "dim"), bool(arg(args, kwargs, 2, "keepdim", False)))


@handles(torch.linalg.vector_norm)
@family(Family.REDUCTION)
def vector_norm(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Labels:
    """``torch.linalg.vector_norm(x, ord, dim, keepdim)``: a reduction (GRN's norm over positions)."""
    x = s.labels(arg(args, kwargs, 0, "x"), node)
    return reduce(s, node, x, arg(args, kwargs, 2, "dim"), bool(arg(args, kwargs, 3, "keepdim", False)))


def reduce(s: State, node: torch.fx.Node, x: Labels, dims: Any, keepdim: bool) -> Labels:
    """The labels of ``x`` reduced over ``dims`` (None: all), as ``reduction`` says."""
    out_shape = s.shape(node)
    if x.dim is None:
        return Labels(out_shape, None, x.ids[:1])
    dims = [] if dims is None else [dims] if isinstance(dims, int) else list(dims)
    dims = [d % len(x.shape) for d in dims] or list(range(len(x.shape)))  # no dims: all of them
    if dims == [x.dim] and canonical(node.target) in MEAN and keys.TREE not in s.gm.meta:
        # a statistic over channels (RMSNorm's mean of squares): the pruned model averages the kept ones
        # (a pruned module tree, ``verify_tree``, masks norm modules only)
        s.mask_norm(node, f"{owner(node)} averages over pruned channels (node {node.name}): statistics change with pruning")
        return Labels(out_shape, None, s.uf.fresh(1))
    if x.dim in dims:
        s.freeze(x, f"{target_name(node)} over the channel dim at node {node.name}")
        return Labels(out_shape, None, x.ids[:1])
    return Labels(out_shape, x.dim if keepdim else x.dim - sum(d < x.dim for d in dims), x.ids)
