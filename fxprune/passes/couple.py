"""couple: shape-annotated GraphModule -> DependencyGraph, by label propagation.

Walks the graph once, carrying ``Labels`` for every tensor (see labels.py). Each op belongs to one
family, and the family says what happens to labels:

* elementwise (add, mul, activations, where ...): labels meeting at one position are merged;
* channel-wise (BatchNorm, pooling, interpolation, padding): labels stay with their channel;
* shape (view, permute, cat, split, getitem, pixel_shuffle ...): the op itself runs on the label tensor;
* contracting (conv, linear, matmul): the contracted labels are read, fresh labels are produced;
* statistics over channels (LayerNorm, GroupNorm): allowed, with a note (see verify.py);
* anything else: every label it touches is frozen, and the reason is kept.

Parameters are tied to labels through *slots* ("index i of ``conv.weight`` dim 0 is label L"); the
union-find classes of labels that own slots are the atoms of the resulting DependencyGraph.
"""

from __future__ import annotations

import math
import operator
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.node import map_aggregate, map_arg
from torch.fx.passes.shape_prop import TensorMetadata

from ..graph import DependencyGraph, FlopTerm, Group, Member, Patch
from ..optable import (
    canonical,
    CHANNEL_PARAM_MODULES,
    CONV_FUNCS,
    ELEMENTWISE_FUNCS,
    ELEMENTWISE_METHODS,
    ELEMENTWISE_MODULES,
    FIRST_OPERAND_FUNCS,
    FIRST_OPERAND_METHODS,
    MATMUL,
    REDUCTIONS,
    RESHAPE_FUNCS,
    RESHAPE_METHODS,
    SHAPE_FUNCS,
    SHAPE_METHODS,
    SOFTMAX,
    SPATIAL_FUNCS,
    SPATIAL_MODULES,
    SPLIT,
)
from .labels import Labels, Param, UnionFind, compress

__all__ = ["couple"]

def _arg(node: torch.fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _target_name(node: torch.fx.Node) -> str:
    t = canonical(node.target)
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


class _Coupler:
    """Abstract interpreter over a shape-annotated GraphModule; see the module docstring."""

    def __init__(self, gm: torch.fx.GraphModule, ignore: Iterable[str], free_output: bool) -> None:
        self.gm = gm
        self.free_output = free_output
        self.modules = dict(gm.named_modules())
        self.uf = UnionFind()
        self.env: dict[torch.fx.Node, Any] = {}
        self.slots: dict[tuple[str, int], list[torch.Tensor]] = defaultdict(list)
        self.member_info: dict[tuple[str, int], Member] = {}
        self.frozen: dict[int, str] = {}
        self.notes: dict[str, str] = {}
        self.patches: list[Patch] = []
        self.flop_terms: list[tuple[str, int, list[torch.Tensor]]] = []
        self.consumers: list[tuple[str, int, int]] = []
        self.param_labels: dict[str, Labels] = {}
        self.ignore = tuple(ignore)
        self.families: dict[str, str] = {}

    # ----------------------------------------------------------------- helpers
    def freeze(self, value: Any, reason: str) -> None:
        def visit(v: Any) -> Any:
            if isinstance(v, Param):
                v = self.as_labels(v)
            if isinstance(v, Labels):
                for lab in v.ids.tolist():
                    self.frozen.setdefault(lab, reason)
            return v

        map_aggregate(value, visit)

    def frozen_like(self, node: torch.fx.Node, reason: str) -> Any:
        """Fresh frozen labels shaped like ``node``'s output (any nesting of tensors)."""

        def make(meta: Any) -> Any:
            if isinstance(meta, TensorMetadata):
                lab = Labels(tuple(meta.shape), None, self.uf.fresh(1))
                self.freeze(lab, reason)
                return lab
            if isinstance(meta, (tuple, list)):
                return type(meta)(make(m) for m in meta) if not hasattr(meta, "_fields") else type(meta)(*map(make, meta))
            if isinstance(meta, dict):
                return {k: make(v) for k, v in meta.items()}
            return meta

        return make(node.meta.get("tensor_meta"))

    def as_labels(self, v: Any) -> Any:
        """Labels for a tensor value; parameters get labels along their last non-singleton dim."""
        if not isinstance(v, Param):
            return v
        if v.name in self.param_labels:
            return self.param_labels[v.name]
        shape = tuple(v.tensor.shape)
        dims = [d for d, s in enumerate(shape) if s > 1]
        if not dims:
            lab = Labels(shape, None, self.uf.fresh(1))
        else:
            lab = Labels(shape, dims[-1], self.uf.fresh(shape[dims[-1]]))
            self.bind(v.name, dims[-1], lab.ids, v.name.rpartition(".")[0] or v.name, "param")
        self.param_labels[v.name] = lab
        return lab

    def bind(self, name: str, dim: int, ids: torch.Tensor, module: str, role: str) -> None:
        self.slots[(name, dim)].append(ids)
        self.member_info.setdefault((name, dim), Member(name, dim, module, role))

    def shape(self, node: torch.fx.Node) -> tuple[int, ...]:
        return tuple(node.meta["tensor_meta"].shape)

    def value(self, a: Any) -> Any:
        return map_arg(a, lambda n: self.env[n])

    def flops(self, node: torch.fx.Node, factors: list[torch.Tensor]) -> None:
        f = int(node.meta.get("fxprune_flops", 0))
        if f:
            self.flop_terms.append((node.name, f // 2, factors))

    # ----------------------------------------------------------------- driver
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op in ("call_function", "call_method", "call_module") and "tensor_meta" not in node.meta:
                self.env[node] = node.meta.get("fxprune_value")
                continue
            try:
                self.env[node] = getattr(self, "op_" + node.op)(node)
            except Exception as exc:  # a rule that cannot handle this use of an op: freeze, never guess
                self.env[node] = self.unknown(node, f"node {node.name} could not be analyzed ({type(exc).__name__}: {exc})")
            if node.op == "call_module" and self.ignore and any(
                node.target == p or node.target.startswith(p + ".") for p in self.ignore
            ):
                self.freeze(self.env[node], f"module {node.target} is in ignore=")

    def op_placeholder(self, node: torch.fx.Node) -> Any:
        if "tensor_meta" not in node.meta:
            return None
        return self.frozen_like(node, f"model input {node.name}")

    def op_get_attr(self, node: torch.fx.Node) -> Any:
        obj = operator.attrgetter(node.target)(self.gm)
        return Param(node.target, obj) if isinstance(obj, torch.Tensor) else obj

    def op_output(self, node: torch.fx.Node) -> Any:
        out = self.value(node.args[0])
        if not self.free_output:
            self.freeze(out, "model output")
        return out

    def op_call_module(self, node: torch.fx.Node) -> Any:
        mod = self.modules[node.target]
        args = [self.value(a) for a in node.args]
        if isinstance(mod, ELEMENTWISE_MODULES):
            return self.elementwise(node, args[:1])
        if isinstance(mod, SPATIAL_MODULES):
            return self.channelwise(node, args[0], {}, node.target)
        if isinstance(mod, CHANNEL_PARAM_MODULES):
            params = {f"{node.target}.{n}": t for n, t in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]}
            return self.channelwise(node, args[0], params, node.target)
        if isinstance(mod, nn.modules.conv._ConvNd):
            bias = f"{node.target}.bias" if mod.bias is not None else None
            return self.conv(node, args[0], Param(f"{node.target}.weight", mod.weight), bias, mod.groups,
                             mod.transposed, node.target)
        if isinstance(mod, nn.Linear):
            bias = f"{node.target}.bias" if mod.bias is not None else None
            return self.linear(node, args[0], Param(f"{node.target}.weight", mod.weight), bias, node.target)
        if isinstance(mod, nn.LayerNorm):
            return self.layer_norm(node, args[0], len(mod.normalized_shape), mod, node.target)
        if isinstance(mod, nn.GroupNorm):
            return self.group_norm(node, args[0], mod.num_groups, mod, node.target)
        if isinstance(mod, (nn.Flatten, nn.PixelShuffle, nn.PixelUnshuffle)):
            return self.run_on_labels(node, lambda x: mod(x))
        if isinstance(mod, (nn.Softmax, nn.LogSoftmax)):
            return self.softmax(node, args[0], mod.dim)
        if isinstance(mod, nn.ChannelShuffle):
            return self.channel_shuffle(node, args[0], mod.groups)
        return self.unknown(node, f"module {node.target} ({type(mod).__name__}) is not understood")

    def op_call_function(self, node: torch.fx.Node) -> Any:
        t = canonical(node.target)
        if isinstance(t, str):  # an aten op that mirrors a Tensor method
            return self.op_call_method(node, t)
        args = [self.value(a) for a in node.args]
        if t in ELEMENTWISE_FUNCS or getattr(t, "__name__", "") == "stochastic_depth":
            return self.elementwise(node, [*args, *self.value(list(node.kwargs.values()))])
        if t in FIRST_OPERAND_FUNCS:
            return self.elementwise(node, args[:1])
        if t is operator.getitem:
            if isinstance(args[0], (Labels, Param)):
                return self.getitem(node, self.as_labels(args[0]))
            return args[0][args[1]]
        return self.dispatch(node, t, args)

    def op_call_method(self, node: torch.fx.Node, name: str | None = None) -> Any:
        name = name or node.target
        args = [self.value(a) for a in node.args]
        if name in ELEMENTWISE_METHODS:
            return self.elementwise(node, [*args, *self.value(list(node.kwargs.values()))])
        if name in FIRST_OPERAND_METHODS:
            return self.elementwise(node, args[:1])
        return self.dispatch(node, name, args)

    def dispatch(self, node: torch.fx.Node, t: Any, args: list[Any]) -> Any:
        """Rules shared by call_function and call_method (``t`` is a function or a method name)."""
        method = isinstance(t, str)
        if t in SHAPE_FUNCS or t in SHAPE_METHODS:
            return self.run_on_labels(node, None)
        if t in RESHAPE_FUNCS or t in RESHAPE_METHODS:
            return self.reshape(node)
        if t in SPLIT:
            return self.split(node, SPLIT[t])
        if t in SPATIAL_FUNCS:
            return self.channelwise(node, args[0], {}, node.name)
        if t in CONV_FUNCS:
            x, w = args[0], args[1]
            b = _arg(node, 2, "bias")
            groups = _arg(node, 6, "groups", 1)
            if isinstance(w, Param) and (b is None or isinstance(self.value(b), Param)) and isinstance(groups, int):
                bias = self.value(b).name if b is not None else None
                return self.conv(node, x, w, bias, groups, CONV_FUNCS[t], node.name)
        if t is F.linear:
            w, b = args[1], self.value(_arg(node, 2, "bias"))
            if isinstance(w, Param) and (b is None or isinstance(b, Param)):
                return self.linear(node, args[0], w, b.name if b is not None else None, node.name)
        if t in MATMUL:
            return self.matmul(node, self.as_labels(args[0]), self.as_labels(args[1]))
        if t is F.layer_norm:
            return self.layer_norm(node, args[0], len(_arg(node, 1, "normalized_shape")), None, node.name)
        if t is F.group_norm:
            return self.group_norm(node, args[0], _arg(node, 1, "num_groups"), None, node.name)
        if t is F.batch_norm or t is F.instance_norm:
            names = ("running_mean", "running_var", "weight", "bias")
            params = {}
            for i, n in enumerate(names):
                p = self.value(_arg(node, 1 + i, n))
                if isinstance(p, Param):
                    params[p.name] = p.tensor
            return self.channelwise(node, args[0], params, node.name)
        if t is F.pad:
            pad = _arg(node, 1, "pad")
            x = self.as_labels(args[0])
            if x.dim is None or x.dim < len(x.shape) - len(pad) // 2:
                return x.with_shape(self.shape(node))
        if t in REDUCTIONS:
            return self.reduction(node, self.as_labels(args[0]))
        if t in SOFTMAX:
            return self.softmax(node, args[0], _arg(node, 1, "dim"))
        if t is F.channel_shuffle or t is torch.channel_shuffle:
            return self.channel_shuffle(node, args[0], _arg(node, 1, "groups"))
        if t == "roll" or t is torch.roll:
            return self.roll(node, self.as_labels(args[0]))
        return self.unknown(node, f"{'method' if method else 'function'} {_target_name(node)} at node {node.name} is not understood")

    # ----------------------------------------------------------------- families
    def unknown(self, node: torch.fx.Node, reason: str) -> Any:
        self.families.setdefault(node.name, "unknown")
        for a in [*node.args, *node.kwargs.values()]:
            self.freeze(self.value(a), reason)
        return self.frozen_like(node, reason)

    def elementwise(self, node: torch.fx.Node, operands: list[Any]) -> Any:
        self.families.setdefault(node.name, "elementwise")
        out_shape = self.shape(node)
        nd = len(out_shape)
        labs = [self.as_labels(v) for v in operands if isinstance(v, (Labels, Param))]
        if not labs:
            return self.frozen_like(node, f"node {node.name} creates a tensor")

        def aligned_size(lab: Labels, d: int) -> int:
            k = d - (nd - len(lab.shape))
            return lab.shape[k] if k >= 0 else 1

        varying = {lab.dim + nd - len(lab.shape) for lab in labs if lab.dim is not None and lab.shape[lab.dim] > 1}
        if len(varying) > 1:
            return self.elementwise_general(node, labs, out_shape)
        if not varying:
            for lab in labs[1:]:
                self.uf.union(int(labs[0].ids[0]), int(lab.ids[0]))
            return Labels(out_shape, None, labs[0].ids[:1])
        d = varying.pop()
        out = next(lab for lab in labs if lab.dim is not None and lab.dim + nd - len(lab.shape) == d)
        for lab in labs:
            if lab is out or aligned_size(lab, d) == 1:
                continue  # broadcast along the channel dim: not tied to any one channel
            if lab.ids.numel() == 1:  # one label over the whole channel dim: tied to every channel
                self.uf.union_pairs(lab.ids.expand_as(out.ids), out.ids)
            else:
                self.uf.union_pairs(lab.ids, out.ids)
        return Labels(out_shape, d, out.ids)

    def elementwise_general(self, node: torch.fx.Node, labs: list[Labels], out_shape: tuple[int, ...]) -> Labels:
        full = [self.full(lab) for lab in labs]
        full = [f.reshape([1] * (len(out_shape) - f.dim()) + list(f.shape)).expand(out_shape) for f in full]
        for f in full[1:]:
            self.uf.union_pairs(full[0], f)
        return compress(self.uf, full[0])

    def channelwise(self, node: torch.fx.Node, x: Any, params: dict[str, torch.Tensor], owner: str) -> Labels:
        self.families.setdefault(node.name, "channelwise")
        x = self.as_labels(x)
        out_shape = self.shape(node)
        if x.dim not in (None, 1):
            self.freeze(x, f"{owner} works per channel on dim 1, but channels vary along dim {x.dim} here")
            x = Labels(x.shape, None, x.ids[:1])
        if x.dim == 1:
            for name, t in params.items():
                if t.dim() == 1 and t.shape[0] == x.shape[1] and x.shape[1] > 1:
                    self.bind(name, 0, x.ids, owner, "param")
            self.patch_attr(node, owner, 1)
        return x.with_shape(out_shape)

    def patch_attr(self, node: torch.fx.Node, owner: str, dim: int) -> None:
        """A per-channel module's width attribute follows its input's pruned size."""
        mod = self.modules.get(node.target) if node.op == "call_module" else None
        if isinstance(mod, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
            field = "num_features"
        elif isinstance(mod, nn.PReLU) and mod.num_parameters > 1:
            field = "num_parameters"
        else:
            return
        self.patches.append(Patch("attr", owner, node.args[0].name, dim, field=field))

    def conv(self, node: torch.fx.Node, x: Any, w: Param, bias: str | None, groups: int, transposed: bool, owner: str) -> Labels:
        self.families.setdefault(node.name, "contract")
        x = self.as_labels(x)
        wt = w.tensor
        c_in = wt.shape[0] if transposed else wt.shape[1] * groups
        c_out = wt.shape[1] * groups if transposed else wt.shape[0]
        in_dim, out_dim = (0, 1) if transposed else (1, 0)
        if x.dim not in (None, 1):
            self.freeze(x, f"{owner} reads channels on dim 1, but channels vary along dim {x.dim} here")
        xin = x.ids if x.dim == 1 else x.ids[:1].expand(c_in)
        src = node.args[0].name
        if groups > 1 and groups == c_in:  # depthwise: each output channel belongs to one input channel
            out_ids = xin.repeat_interleave(c_out // c_in)
            if transposed:
                self.bind(w.name, 0, xin, owner, "in")
            else:
                self.bind(w.name, 0, out_ids, owner, "out")
            factors = [out_ids]
            if node.op == "call_module":
                self.patches.append(Patch("attr", owner, src, 1, field="groups"))
            else:
                path = ("args", 6) if len(node.args) > 6 else ("kwargs", "groups")
                self.patches.append(Patch("arg", node.name, src, 1, path=path))
        else:
            ipg, opg = c_in // groups, c_out // groups
            out_ids = self.uf.fresh(c_out)
            if groups > 1:  # every group loses the same positions, so the group count can stay
                self.uf.union_pairs(xin, xin[:ipg].repeat(groups))
                self.uf.union_pairs(out_ids, out_ids[:opg].repeat(groups))
            w_in = xin if transposed else xin[:ipg]
            w_out = out_ids[:opg] if transposed else out_ids
            self.bind(w.name, in_dim, w_in, owner, "in")
            self.bind(w.name, out_dim, w_out, owner, "out")
            self.consumers.append((node.name, 0, 1))
            factors = [w_in, w_out]
        if bias is not None:
            self.bind(bias, 0, out_ids, owner, "out")
        self.flops(node, factors)
        if node.op == "call_module":
            self.patches.append(Patch("attr", owner, src, 1, field="in_channels"))
            self.patches.append(Patch("attr", owner, node.name, 1, field="out_channels"))
        return Labels(self.shape(node), 1, out_ids)

    def linear(self, node: torch.fx.Node, x: Any, w: Param, bias: str | None, owner: str) -> Labels:
        self.families.setdefault(node.name, "contract")
        x = self.as_labels(x)
        out_shape = self.shape(node)
        last = len(x.shape) - 1
        n_out, n_in = w.tensor.shape
        if x.dim not in (None, last) and x.shape[x.dim] > 1:
            # Channels vary along a dim the linear does not contract: they pass through unchanged,
            # and the linear's own output features cannot be pruned.
            self.flops(node, [x.ids])
            return x.with_shape(out_shape)
        xin = x.ids if x.dim == last else x.ids[:1].expand(n_in)
        out_ids = self.uf.fresh(n_out)
        self.bind(w.name, 1, xin, owner, "in")
        self.bind(w.name, 0, out_ids, owner, "out")
        if bias is not None:
            self.bind(bias, 0, out_ids, owner, "out")
        self.consumers.append((node.name, 0, last))
        self.flops(node, [xin, out_ids])
        if node.op == "call_module":
            self.patches.append(Patch("attr", owner, node.args[0].name, last, field="in_features"))
            self.patches.append(Patch("attr", owner, node.name, len(out_shape) - 1, field="out_features"))
        return Labels(out_shape, len(out_shape) - 1, out_ids)

    def matmul(self, node: torch.fx.Node, a: Labels, b: Labels) -> Labels:
        self.families.setdefault(node.name, "contract")
        out_shape = self.shape(node)
        if len(a.shape) < 2 or len(b.shape) < 2:
            return self.unknown(node, f"matmul with a 1-d operand at node {node.name}")
        ad = None if a.dim is None or a.shape[a.dim] == 1 else a.dim - len(a.shape)
        bd = None if b.dim is None or b.shape[b.dim] == 1 else b.dim - len(b.shape)
        factors: list[torch.Tensor] = []
        if ad == -1 and bd == -2:
            self.uf.union_pairs(a.ids, b.ids)
        if ad == -1 or bd == -2:
            factors.append(a.ids if ad == -1 else b.ids)
            if ad == -1:
                self.consumers.append((node.name, 0, len(a.shape) - 1))
            if bd == -2:
                self.consumers.append((node.name, 1, len(b.shape) - 2))
        carried = [(lab, d) for lab, d in ((a, ad), (b, bd)) if d is not None and not (lab is a and d == -1) and not (lab is b and d == -2)]
        if len(carried) > 1:
            for lab, _ in carried:
                self.freeze(lab, f"matmul at node {node.name} keeps channels of both operands")
            carried = []
        if carried:
            lab, d = carried[0]
            factors.append(lab.ids)
        self.flops(node, factors)
        if carried:
            return Labels(out_shape, len(out_shape) + carried[0][1], carried[0][0].ids)
        return Labels(out_shape, None, self.uf.fresh(1))

    def layer_norm(self, node: torch.fx.Node, x: Any, k: int, mod: nn.Module | None, owner: str) -> Labels:
        self.families.setdefault(node.name, "norm")
        x = self.as_labels(x)
        out = x.with_shape(self.shape(node))
        nd = len(x.shape)
        if x.dim is None or x.dim < nd - k or x.shape[x.dim] == 1:
            return out
        if k != 1:
            self.freeze(x, f"{owner} normalizes over several dims including the channel dim")
            return out
        self.notes[node.name] = f"{owner} normalizes over pruned channels: statistics change with pruning"
        for name in self.norm_params(node, mod, owner):
            self.bind(name, 0, x.ids, owner, "param")
        if mod is not None:
            self.patches.append(Patch("attr", owner, node.args[0].name, x.dim, field="normalized_shape", as_tuple=True))
        else:
            path = ("args", 1) if len(node.args) > 1 else ("kwargs", "normalized_shape")
            self.patches.append(Patch("arg", node.name, node.args[0].name, x.dim, path=path, as_tuple=True))
        return out

    def group_norm(self, node: torch.fx.Node, x: Any, groups: int, mod: nn.Module | None, owner: str) -> Labels:
        self.families.setdefault(node.name, "norm")
        x = self.as_labels(x)
        out = x.with_shape(self.shape(node))
        if x.dim != 1 or x.shape[1] == 1:
            if x.dim is not None:
                self.freeze(x, f"{owner} expects channels on dim 1")
            return out
        c = x.shape[1]
        for name in self.norm_params(node, mod, owner):
            self.bind(name, 0, x.ids, owner, "param")
        src = node.args[0].name
        if mod is not None:
            self.patches.append(Patch("attr", owner, src, 1, field="num_channels"))
        if groups == c:
            if mod is not None:
                self.patches.append(Patch("attr", owner, src, 1, field="num_groups"))
            else:
                path = ("args", 1) if len(node.args) > 1 else ("kwargs", "num_groups")
                self.patches.append(Patch("arg", node.name, src, 1, path=path))
            return out
        if groups > 1:
            self.uf.union_pairs(x.ids, x.ids[: c // groups].repeat(groups))
        self.notes[node.name] = f"{owner} normalizes over groups of pruned channels: statistics change with pruning"
        return out

    def norm_params(self, node: torch.fx.Node, mod: nn.Module | None, owner: str) -> list[str]:
        """Qualified names of a LayerNorm/GroupNorm's affine parameters (module or functional form)."""
        if mod is not None:
            return [f"{owner}.{n}" for n, _ in mod.named_parameters(recurse=False)]
        found = [self.value(_arg(node, i, name)) for i, name in ((2, "weight"), (3, "bias"))]
        return [p.name for p in found if isinstance(p, Param)]

    def softmax(self, node: torch.fx.Node, x: Any, dim: int | None) -> Labels:
        self.families.setdefault(node.name, "elementwise")
        x = self.as_labels(x)
        nd = len(x.shape)
        if x.dim is not None and (dim is None or dim % nd == x.dim):
            self.freeze(x, f"softmax over the channel dim at node {node.name}")
        return x.with_shape(self.shape(node))

    def reduction(self, node: torch.fx.Node, x: Labels) -> Labels:
        self.families.setdefault(node.name, "reduction")
        dims = _arg(node, 1, "dim")
        keepdim = bool(_arg(node, 2, "keepdim", False))
        nd = len(x.shape)
        dims = list(range(nd)) if dims is None else [d % nd for d in ((dims,) if isinstance(dims, int) else dims)]
        out_shape = self.shape(node)
        if x.dim is None:
            return Labels(out_shape, None, x.ids[:1])
        if x.dim in dims:
            self.freeze(x, f"{_target_name(node)} over the channel dim at node {node.name}")
            return Labels(out_shape, None, x.ids[:1])
        new_dim = x.dim if keepdim else x.dim - sum(d < x.dim for d in dims)
        return Labels(out_shape, new_dim, x.ids)

    def roll(self, node: torch.fx.Node, x: Labels) -> Any:
        dims = _arg(node, 2, "dims")
        nd = len(x.shape)
        dims = [] if dims is None else [d % nd for d in ((dims,) if isinstance(dims, int) else dims)]
        if x.dim is not None and (not dims or x.dim in dims):
            self.freeze(x, f"roll along the channel dim at node {node.name}")
        return self.run_on_labels(node, None)

    def channel_shuffle(self, node: torch.fx.Node, x: Any, groups: int) -> Labels:
        """Channel shuffle is a view to (groups, C/groups), a transpose and a flatten: run exactly that."""
        x = self.as_labels(x)
        if x.dim not in (None, 1):
            self.freeze(x, f"channel shuffle at node {node.name} expects channels on dim 1")
            return x
        n, c, *rest = x.shape
        t = self.full(x).view(n, groups, c // groups, *rest)
        mid = compress(self.uf, t, frozenset({2}))
        if mid.dim not in (None, 2):
            self.freeze(x, f"channel shuffle at node {node.name}")
        return compress(self.uf, mid.full().transpose(1, 2).reshape(x.shape))

    # ----------------------------------------------------------------- shape ops
    def full(self, lab: Labels) -> torch.Tensor:
        """The label tensor of ``lab``, with every label replaced by its current root."""
        return Labels(lab.shape, lab.dim, self.uf.roots(lab.ids)).full()

    def run_on_labels(self, node: torch.fx.Node, fn: Callable[..., Any] | None, force: frozenset[int] = frozenset()) -> Any:
        self.families.setdefault(node.name, "shape")
        fast = self.layout(node)
        if fast is not None:
            return fast

        def full(v: Any) -> Any:
            v = self.as_labels(v)
            return self.full(v) if isinstance(v, Labels) else v

        args = map_aggregate(self.value(node.args), full)
        kwargs = map_aggregate(self.value(node.kwargs), full)
        if fn is None:
            fn = node.target if node.op == "call_function" else (lambda s, *a, **k: getattr(s, node.target)(*a, **k))
        result = fn(*args, **kwargs)
        return map_aggregate(result, lambda r: compress(self.uf, r, force) if isinstance(r, torch.Tensor) else r)

    def layout(self, node: torch.fx.Node) -> Labels | None:
        """Ops that only move, merge or join dims, done on compact labels (None: materialize instead)."""
        meta = node.meta.get("tensor_meta")
        if not isinstance(meta, TensorMetadata):
            return None
        out_shape = tuple(meta.shape)
        name = _target_name(node)
        mod = self.modules[node.target] if node.op == "call_module" else None
        if mod is not None:
            if not isinstance(mod, nn.Flatten):
                return None
            name = "flatten"
        if name in ("cat", "concat", "concatenate"):
            return self.layout_cat(node, out_shape)
        x = self.as_labels(self.env.get(node.args[0]) if isinstance(node.args[0], torch.fx.Node) else None)
        if not isinstance(x, Labels):
            return None
        if x.dim is None:
            return Labels(out_shape, None, x.ids)
        n, d, ids = len(x.shape), x.dim, x.ids
        rest = list(node.args[1:])

        def norm(k: int, size: int = n) -> int:
            return k % size

        if name == "permute":
            dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest or node.kwargs.get("dims")
            new = [norm(k) for k in dims].index(d)
        elif name in ("transpose", "swapaxes"):
            a, b = norm(rest[0]), norm(rest[1])
            new = b if d == a else a if d == b else d
        elif name == "t":
            new = 1 - d if n == 2 else d
        elif name == "unsqueeze":
            k = norm(_arg(node, 1, "dim"), n + 1)
            new = d + (k <= d)
        elif name == "flatten":
            if mod is not None:
                start, end = norm(mod.start_dim), norm(mod.end_dim)
            else:
                start, end = norm(_arg(node, 1, "start_dim", 0)), norm(_arg(node, 2, "end_dim", -1))
            if d < start:
                new = d
            elif d > end:
                new = d - (end - start)
            else:
                inner = math.prod(x.shape[d + 1:end + 1])
                ids, new = ids.repeat_interleave(inner).repeat(math.prod(x.shape[start:d])), start
        else:
            return None
        return Labels(out_shape, new, ids) if out_shape[new] == ids.numel() else None

    def layout_cat(self, node: torch.fx.Node, out_shape: tuple[int, ...]) -> Labels | None:
        labs = [self.as_labels(v) for v in self.value(node.args[0])]
        if not all(isinstance(lab, Labels) for lab in labs):
            return None
        dim = _arg(node, 1, "dim", 0) % len(out_shape)
        if all(lab.dim in (dim, None) for lab in labs):
            return Labels(out_shape, dim, torch.cat([lab.ids if lab.dim == dim else lab.ids[:1].expand(lab.shape[dim]) for lab in labs]))
        first = labs[0]
        if all(lab.dim == first.dim and torch.equal(self.uf.roots(lab.ids), self.uf.roots(first.ids)) for lab in labs):
            return Labels(out_shape, first.dim, first.ids)
        return None

    def reshape(self, node: torch.fx.Node) -> Any:
        a = node.args
        if node.op == "call_method" and len(a) == 2 and isinstance(a[1], (tuple, list)):
            base, sizes = ("args", 1), a[1]
        elif node.op == "call_method" and len(a) > 1:
            base, sizes = ("args",), a[1:]
        elif len(a) > 1:
            base, sizes = ("args", 1), a[1]
        else:
            key = "shape" if "shape" in node.kwargs else "size"
            base, sizes = ("kwargs", key), node.kwargs.get(key, ())
        sizes = sizes if isinstance(sizes, (tuple, list)) else ()
        sources = {d: self.channel_sources(s) for d, s in enumerate(sizes)}
        out = self.run_on_labels(node, None, frozenset(d for d, src in sources.items() if src))
        for d, src in sources.items():
            # A size read from another tensor's channel count only follows pruning if both tensors
            # lose the same channels.
            for lab in src:
                if out.dim != d or set(self.uf.roots(lab.ids).tolist()) != set(self.uf.roots(out.ids).tolist()):
                    self.freeze(lab, f"node {node.name} takes a size from the channel count of another tensor")
                    self.freeze(out, f"node {node.name} takes a size from the channel count of another tensor")
        if out.dim is not None and len(sizes) == len(out.shape):
            s = sizes[out.dim]
            if isinstance(s, int) and s != -1:
                idx = out.dim + (1 if base == ("args",) else 0)
                self.patches.append(Patch("arg", node.name, node.name, out.dim, path=(*base, idx)))
        return out

    def channel_sources(self, arg: Any) -> list[Labels]:
        """Labels of the tensors whose channel count a size argument is computed from (``x.size(1) // 2``)."""
        stack, seen, found = [arg], set(), []
        while stack:
            n = stack.pop()
            if not isinstance(n, torch.fx.Node) or n in seen or "tensor_meta" in n.meta:
                continue
            seen.add(n)
            base, dim = self.size_source(n)
            if base is not None:
                x = self.as_labels(self.env[base])
                if isinstance(x, Labels) and x.dim is not None and dim is not None and dim % len(x.shape) == x.dim:
                    found.append(x)
                continue
            stack.extend(n.all_input_nodes)
        return found

    def size_source(self, n: torch.fx.Node) -> tuple[torch.fx.Node | None, int | None]:
        """(tensor, dim) when ``n`` reads one size of a tensor: ``x.size(d)``, ``x.size()[d]``, ``x.shape[d]``."""
        def whole(m: Any) -> torch.fx.Node | None:
            if isinstance(m, torch.fx.Node) and m.op == "call_method" and m.target == "size" and len(m.args) == 1 and not m.kwargs:
                return m.args[0]
            if isinstance(m, torch.fx.Node) and m.op == "call_function" and m.target is getattr and m.args[1] == "shape":
                return m.args[0]
            return None

        if n.op == "call_method" and n.target == "size" and (len(n.args) > 1 or n.kwargs):
            return n.args[0], _arg(n, 1, "dim")
        if n.op == "call_function" and n.target is operator.getitem and whole(n.args[0]) is not None and isinstance(n.args[1], int):
            return whole(n.args[0]), n.args[1]
        if whole(n) is not None:
            return whole(n), None
        return None, None

    def split(self, node: torch.fx.Node, kind: str) -> Any:
        x = self.as_labels(self.env[node.args[0]])
        out = self.run_on_labels(node, None)
        dim = _arg(node, 2, "dim", 0) % len(x.shape)
        if x.dim == dim:
            self.patches.append(Patch("split", node.name, node.args[0].name, dim, field=kind))
        return out

    def getitem(self, node: torch.fx.Node, x: Labels) -> Any:
        tensors: list[Any] = []
        map_aggregate(self.value(node.args[1]), lambda v: tensors.append(v) if isinstance(v, (Labels, Param)) else v)
        if tensors:
            # Indexing with a tensor: run it with the real index values (constant ones only) and freeze.
            if any(isinstance(v, Labels) for v in tensors):
                return self.unknown(node, f"node {node.name} indexes with a computed tensor")
            self.families.setdefault(node.name, "shape")
            index = map_aggregate(self.value(node.args[1]), lambda v: v.tensor if isinstance(v, Param) else v)
            self.freeze(x, f"node {node.name} gathers with an index tensor")
            return compress(self.uf, self.full(x)[index])
        out = self.run_on_labels(node, None)
        if x.dim is None:
            return out
        idx = node.args[1]
        entries = list(idx) if isinstance(idx, tuple) else [idx]
        if any(e is Ellipsis for e in entries):
            k = entries.index(Ellipsis)
            n_real = sum(e is not None for e in entries) - 1
            entries = entries[:k] + [slice(None)] * (len(x.shape) - n_real) + entries[k + 1:]
        dim = 0
        for pos, e in enumerate(entries):
            if e is None:
                continue
            if dim == x.dim:
                if isinstance(e, slice) and e == slice(None):
                    break
                ev = self.value(e)
                if isinstance(ev, slice) and ev.step in (None, 1):
                    path = ("args", 1, pos) if isinstance(idx, tuple) else ("args", 1)
                    self.patches.append(Patch("slice", node.name, node.args[0].name, x.dim, path=path))
                elif isinstance(ev, int):
                    self.freeze(Labels((1,), 0, x.ids[ev:ev + 1] if ev >= 0 else x.ids[ev:][:1]),
                                f"node {node.name} selects a single channel")
                else:
                    self.freeze(x, f"node {node.name} indexes the channel dim")
                break
            dim += 1
        return out


def _first_appearance_ids(values: torch.Tensor) -> torch.Tensor:
    """Dense ids for the distinct values, numbered in order of first appearance."""
    uniq, inverse = torch.unique(values, return_inverse=True)
    first = torch.full((uniq.numel(),), values.numel(), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(values.numel()), "amin")
    rank = torch.empty_like(first)
    rank[torch.argsort(first)] = torch.arange(first.numel())
    return rank[inverse]


def _finalize(c: _Coupler, opaque: tuple[str, ...]) -> DependencyGraph:
    uf = c.uf
    # A parameter index bound to several labels ties them together.
    for bound in c.slots.values():
        for ids in bound[1:]:
            uf.union_pairs(bound[0], ids)
    root = uf.root_table()
    keys = list(c.slots)
    # Atoms are the roots that own slots, numbered in order of first appearance.
    slot_roots = torch.cat([root[c.slots[k][0]] for k in keys]) if keys else torch.empty(0, dtype=torch.long)
    ids = _first_appearance_ids(slot_roots)
    atom_of = torch.full((len(uf.parent),), -1, dtype=torch.long)
    atom_of[slot_roots] = ids
    num_atoms = int(ids.max()) + 1 if ids.numel() else 0

    def to_atoms(ids: torch.Tensor) -> torch.Tensor:
        return atom_of[root[ids]]

    member_atoms = {k: to_atoms(c.slots[k][0]) for k in keys}
    reasons: dict[int, list[str]] = defaultdict(list)
    by_reason: dict[str, list[int]] = defaultdict(list)
    for lab, why in c.frozen.items():
        by_reason[why].append(lab)
    for why, labs in by_reason.items():
        for a in torch.unique(to_atoms(torch.tensor(labs))).tolist():
            if a >= 0 and len(reasons[a]) < 3:
                reasons[a].append(why)

    # Atoms with the same members (and the same freeze reasons) form a group; compare members through
    # a sum of random 62-bit codes, one per member.
    codes = torch.randint(0, 2**62, (len(keys),), generator=torch.Generator().manual_seed(0))
    signature = torch.zeros(num_atoms, dtype=torch.long)
    for k, key in enumerate(keys):
        present = torch.unique(member_atoms[key])
        signature.index_add_(0, present, codes[k].expand(present.numel()).contiguous())
    for a, r in reasons.items():
        signature[a] += hash(tuple(r)) % 2**62
    atom_group = _first_appearance_ids(signature)
    group_atoms = [[] for _ in range(int(atom_group.max()) + 1 if num_atoms else 0)]
    for a, g in enumerate(atom_group.tolist()):
        group_atoms[g].append(a)
    group_members: list[list[Member]] = [[] for _ in group_atoms]
    for key in keys:
        for g in torch.unique(atom_group[member_atoms[key]]).tolist():
            group_members[g].append(c.member_info[key])
    groups = [
        Group(gid, torch.tensor(atoms, dtype=torch.long), tuple(group_members[gid]), tuple(reasons.get(atoms[0], ())))
        for gid, atoms in enumerate(group_atoms)
    ]

    values = {node: c.param_labels.get(v.name, v) if isinstance(v, Param) else v for node, v in c.env.items()}
    tensor_atoms = {node.name: (v.dim, to_atoms(v.ids)) for node, v in values.items() if isinstance(v, Labels) and v.dim is not None}
    flop_terms = [FlopTerm(name, macs, tuple(to_atoms(f) for f in fs)) for name, macs, fs in c.flop_terms]
    return DependencyGraph(
        groups=groups,
        member_atoms=member_atoms,
        members=dict(c.member_info),
        tensor_atoms=tensor_atoms,
        patches=c.patches,
        flop_terms=flop_terms,
        consumers=c.consumers,
        notes=c.notes,
        families=c.families,
        num_atoms=num_atoms,
        opaque=opaque,
        atom_group=atom_group,
    )


def couple(gm: torch.fx.GraphModule, ignore: Iterable[str] = (), free_output: bool = False) -> DependencyGraph:
    """Build the DependencyGraph of a GraphModule annotated by the shapes pass.

    The model's outputs keep all their channels unless ``free_output`` (used only to drop classes).
    """
    c = _Coupler(gm, ignore, free_output)
    with torch.no_grad():
        c.run()
    opaque = tuple(gm.meta.get("fxprune_opaque", ()))
    return _finalize(c, opaque)
