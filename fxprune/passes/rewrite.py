"""rewrite: GraphModule + DependencyGraph + Plan -> a new, smaller GraphModule.

The result owns every tensor it uses: pruned parameters and buffers are sliced with ``index_select``,
the others are cloned, so training the result never touches the input model. Module attributes
(``out_channels``, ``num_features`` ...) and graph literals (reshape sizes, split sizes, slices along a
channel dim, ``normalized_shape``) follow the pruned sizes, as listed by the coupling pass's patches.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Any

import torch
import torch.fx
from torch import nn

from ..core import metakeys as keys
from ..core.codegen import DirectGraphModule
from ..core.fxutil import MMAP_MAX, copy_graph, copy_modes, module_copy, modules_of
from ..core.groups import DependencyGraph, Patch, PatchKind, Plan
from ..core.masks import Kept, removed_mask
from ..core.optable import IN_FIELDS, OUT_FIELDS, module_channels

__all__ = ["rewrite"]

_GATHER_ABOVE = 2**16
"""Elements of a matrix's copy above which its pruned dim 1 is gathered (``torch.gather`` of the expanded
index) rather than ``index_select``-ed: ``index_select`` along dim 1 writes at half the speed or less
(MobileNetV2's 1000x1280 classifier to 1000x640: 2.1 ms -> 1.1 ms in its compile; 1000x1280 to 1000x888:
0.94 -> 0.37 ms). A tensor pruned along dims 0 and 1 loses its rows first (contiguous copies), then its
columns: 0.3 ms for MobileNetV3's 1280x960 matrix to 888x672, where one advanced-index gather took 1.6 ms,
unless the rows alone would be over ``MMAP_MAX``: that intermediate costs its page faults, and the one
gather is faster (VGG-16's 4096x25088 classifier; 4096x4096 to 70%: 14 ms, against 20 ms in two steps)."""

_SHAPE_META = frozenset({keys.TENSOR_META, keys.VALUE, keys.FLOPS})
"""Node meta of the original's shapes and values, which the result's nodes do not keep."""

_NODE_PATCHES = (PatchKind.ARG, PatchKind.SLICE, PatchKind.SPLIT, PatchKind.VALUE)
"""The patches that edit graph nodes: the lines of the result's code that are not the captured module's."""


def _set_in(container: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(container, dict):
        return {**container, head: _set_in(container.get(head), rest, value)}
    items = list(container)
    items[head] = _set_in(items[head], rest, value)
    return type(container)(items) if not isinstance(container, torch.Size) else tuple(items)


def _get_in(node: torch.fx.Node, path: tuple[Any, ...]) -> Any:
    obj: Any = node.args if path[0] == "args" else node.kwargs
    for p in path[1:]:
        obj = obj[p]
    return obj


class _Rewriter:
    def __init__(self, gm: torch.fx.GraphModule, deps: DependencyGraph, plan: Plan, modules: dict[str, nn.Module] | None) -> None:
        self.gm = gm
        self.deps = deps
        self.removed = removed_mask(deps, plan)
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.modules = modules_of(gm) if modules is None else modules
        self.members = Kept(self.removed, deps.member_layout)
        self.by_name: dict[str, dict[int, torch.Tensor]] = {}
        for name, dim in self.members.pruned():
            self.by_name.setdefault(name, {})[dim] = self.members.positions((name, dim))
        self.tensors = deps.tensor_layout.kept(self.removed)

    def tensor_kept(self, name: str, dim: int) -> torch.Tensor:
        """Kept-position mask of node ``name``'s output along ``dim``."""
        entry = self.deps.tensor_atoms.get(name)
        if entry is not None and entry[0] == dim:
            return self.tensors.mask(name)
        return torch.ones(self.nodes[name].meta[keys.TENSOR_META].shape[dim], dtype=torch.bool)

    def size(self, p: Patch) -> Any:
        entry = self.deps.tensor_atoms.get(p.node)
        n = self.tensors.count[p.node] if entry is not None and entry[0] == p.dim else self.nodes[p.node].meta[keys.TENSOR_META].shape[p.dim]
        return (n,) if p.as_tuple else n

    def new_tensor(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """``t`` sliced as the plan says, or cloned; called under ``no_grad`` (``attributes``), so no copy records history."""
        data = t
        pruned = self.by_name.get(name)
        if not pruned:
            data = data.clone()
        elif set(pruned) == {0, 1} and data.numel() // data.shape[0] * len(pruned[0]) * data.element_size() > MMAP_MAX:
            data = data[pruned[0][:, None], pruned[1]]  # one copy: see _GATHER_ABOVE
        else:
            for d in sorted(pruned):
                idx = pruned[d]
                if d == 1 and data.dim() == 2 and data.shape[0] * len(idx) > _GATHER_ABOVE:
                    data = torch.gather(data, 1, idx.expand(data.shape[0], -1))
                else:
                    data = data.index_select(d, idx)
        if isinstance(t, nn.Parameter):
            return nn.Parameter(data, requires_grad=t.requires_grad)
        return data

    def copy_module(self, mod: nn.Module, prefix: str) -> nn.Module:
        new = module_copy(mod)
        new.__dict__.update(
            _parameters={k: None if v is None else self.new_tensor(f"{prefix}{k}", v) for k, v in mod._parameters.items()},
            _buffers={k: None if v is None else self.new_tensor(f"{prefix}{k}", v) for k, v in mod._buffers.items()},
            _modules={k: None if v is None else self.copy_module(v, f"{prefix}{k}.") for k, v in mod._modules.items()})
        return new

    def patch_graph(self, val_map: dict[torch.fx.Node, torch.fx.Node]) -> None:
        new_nodes = {old.name: new for old, new in val_map.items()}
        for p in self.deps.patches:
            node = new_nodes.get(p.target)
            if p.kind == PatchKind.ARG:
                self.set_arg(node, p.path, self.size(p))
            elif p.kind == PatchKind.SLICE:
                s = _get_in(self.nodes[p.target], p.path)
                s = slice(*(self.int_value(v) for v in (s.start, s.stop, s.step)))
                kept = self.tensor_kept(p.node, p.dim)
                start, stop, _ = s.indices(kept.numel())
                self.set_arg(node, p.path, slice(int(kept[:start].sum()), int(kept[:max(stop, start)].sum()), None))
            elif p.kind == PatchKind.SPLIT:
                self.make_split(node, p)
            elif p.kind == PatchKind.VALUE:
                self.set_arg(node, p.path, p.value)

    def int_value(self, v: Any) -> Any:
        return v.meta[keys.VALUE] if isinstance(v, torch.fx.Node) else v

    def set_arg(self, node: torch.fx.Node, path: tuple[Any, ...], value: Any) -> None:
        if path[0] == "args":
            node.args = _set_in(node.args, path[1:], value)
        else:
            node.kwargs = _set_in(node.kwargs, path[1:], value)

    def make_split(self, node: torch.fx.Node, p: Patch) -> None:
        old = self.nodes[p.target]
        kept = self.tensor_kept(p.node, p.dim)
        sizes, start = [], 0
        for meta in old.meta[keys.TENSOR_META]:
            end = start + meta.shape[p.dim]
            sizes.append(int(kept[start:end].sum()))
            start = end
        x = node.args[0]
        if node.op == "call_method":
            node.target = "split"
        else:
            node.target = torch.split
        node.args = (x, sizes)
        node.kwargs = {"dim": p.dim}

    @torch.no_grad()
    def attributes(self, graph: torch.fx.Graph) -> dict[str, Any]:
        """What each ``call_module`` and ``get_attr`` target of ``graph`` is in the result: copies of the
        modules with their tensors sliced, sliced or cloned tensors, other values as they are."""
        attrs: dict[str, Any] = {}
        for n in graph.nodes:
            if n.op == "call_module" and n.target not in attrs:
                attrs[n.target] = self.copy_module(self.modules[n.target], n.target + ".")
        called = set(attrs)
        for n in graph.nodes:
            if n.op != "get_attr" or n.target in attrs:
                continue
            owner_name, _, field = n.target.rpartition(".")
            inside = owner_name
            while inside and inside not in called:  # the innermost module the graph also calls, if any
                inside = inside.rpartition(".")[0]
            if inside in called:  # a tensor of a called module: the copy's own
                attrs[n.target] = attrgetter(n.target[len(inside) + 1:])(attrs[inside])
                continue
            value = getattr(self.modules[owner_name], field)
            attrs[n.target] = self.new_tensor(n.target, value) if isinstance(value, torch.Tensor) else value
        for p in self.deps.patches:
            if p.kind == PatchKind.ATTR and p.target in attrs:
                setattr(attrs[p.target], p.field, self.size(p))
        return attrs

    def run(self) -> torch.fx.GraphModule:
        gm = self.gm
        new_graph, val_map, _ = copy_graph(gm.graph, _SHAPE_META)
        self.patch_graph(val_map)
        attrs = self.attributes(new_graph)
        new = DirectGraphModule(attrs, new_graph, gm.__class__.__name__, code_of=gm if isinstance(gm, DirectGraphModule) else None,
                                edited={p.target for p in self.deps.patches if p.kind in _NODE_PATCHES})
        copy_modes(gm, new, self.modules)
        for p in self.deps.patches:
            if p.kind == PatchKind.ATTR and p.target not in attrs:
                setattr(new.get_submodule(p.target), p.field, self.size(p))
        new.training = gm.training
        new.meta[keys.RECORD] = {"kept": self.kept_record()}
        return new

    def kept_record(self) -> dict[str, Any]:
        """JSON-ready record of kept indices, for every parameter/buffer (by dim; ``{}``: nothing removed)
        and every called module (its input and output channels)."""
        params: dict[str, dict[str, list[int]]] = {  # the state_dict's keys, in its order
            f"{prefix}{'.' if prefix else ''}{k}": {} for prefix, m in self.modules.items()
            for table, skip in ((m._parameters, ()), (m._buffers, m._non_persistent_buffers_set)) for k, t in table.items()
            if t is not None and k not in skip}
        pruned = self.members.pruned()
        for (name, dim), idx in zip(pruned, self.members.lists(pruned)):
            params.setdefault(name, {})[str(dim)] = idx
        tensors = dict(zip(self.tensors.count, self.tensors.lists(list(self.tensors.count))))
        modules: dict[str, dict[str, list[int]]] = {}
        for n in self.gm.graph.nodes:
            if n.op != "call_module":
                continue
            mod, entry = self.modules[n.target], {}
            src = n.args[0] if n.args and isinstance(n.args[0], torch.fx.Node) else None
            for key, tensor, fields in (("in", src, IN_FIELDS), ("out", n, OUT_FIELDS)):
                if tensor is not None and tensor.name in tensors:
                    entry[key] = list(tensors[tensor.name])
                elif (width := module_channels(mod, fields)) is not None:
                    entry[key] = list(range(width))
            modules[n.target] = entry
        return {"parameters": params, "modules": modules}


def rewrite(gm: torch.fx.GraphModule, deps: DependencyGraph, plan: Plan, modules: dict[str, nn.Module] | None = None) -> torch.fx.GraphModule:
    """A new GraphModule that keeps only the atoms ``plan`` keeps; ``gm`` is left as it was.
    ``modules``: ``modules_of(gm)`` when the caller has it."""
    return _Rewriter(gm, deps, plan, modules).run()
