"""rewrite: GraphModule + DependencyGraph + Plan -> a new, smaller GraphModule.

The result owns every tensor it uses: pruned parameters and buffers are sliced with ``index_select``,
the others are cloned, so training the result never touches the input model. Module attributes
(``out_channels``, ``num_features`` ...) and graph literals (reshape sizes, split sizes, slices along a
channel dim, ``normalized_shape``) follow the pruned sizes, as listed by the coupling pass's patches.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx
from torch import nn

from ..core import metakeys as keys
from ..core.codegen import DirectGraphModule
from ..core.fxutil import copy_graph, copy_modes
from ..core.groups import DependencyGraph, Patch, PatchKind, Plan
from ..core.masks import kept_masks, removed_mask
from ..core.optable import IN_FIELDS, OUT_FIELDS, module_channels

__all__ = ["rewrite"]


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
    def __init__(self, gm: torch.fx.GraphModule, deps: DependencyGraph, plan: Plan) -> None:
        self.gm = gm
        self.deps = deps
        self.removed = removed_mask(deps, plan)
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.kept = {key: mask.nonzero().flatten() for key, mask in kept_masks(self.removed, deps.member_atoms).items() if not bool(mask.all())}
        self.tensor_kept_masks = kept_masks(self.removed, {name: atoms for name, (_, atoms) in deps.tensor_atoms.items()})

    def tensor_kept(self, name: str, dim: int) -> torch.Tensor:
        """Kept-position mask of node ``name``'s output along ``dim``."""
        entry = self.deps.tensor_atoms.get(name)
        if entry is not None and entry[0] == dim:
            return self.tensor_kept_masks[name]
        return torch.ones(self.nodes[name].meta[keys.TENSOR_META].shape[dim], dtype=torch.bool)

    def size(self, p: Patch) -> Any:
        n = int(self.tensor_kept(p.node, p.dim).sum())
        return (n,) if p.as_tuple else n

    def new_tensor(self, name: str, t: torch.Tensor) -> torch.Tensor:
        data = t.detach()
        pruned = {d: self.kept[(name, d)] for d in range(data.dim()) if (name, d) in self.kept}
        if not pruned:
            data = data.clone()
        elif set(pruned) == {0, 1}:  # one gather instead of two copies: the usual conv/linear weight
            data = data[pruned[0][:, None], pruned[1]]
        else:
            for d, idx in pruned.items():
                data = data.index_select(d, idx)
        if isinstance(t, nn.Parameter):
            return nn.Parameter(data, requires_grad=t.requires_grad)
        return data

    def copy_module(self, mod: nn.Module, prefix: str) -> nn.Module:
        new = copy.copy(mod)
        new._parameters = {k: None if v is None else self.new_tensor(f"{prefix}{k}", v) for k, v in mod._parameters.items()}
        new._buffers = {k: None if v is None else self.new_tensor(f"{prefix}{k}", v) for k, v in mod._buffers.items()}
        new._modules = {k: None if v is None else self.copy_module(v, f"{prefix}{k}.") for k, v in mod._modules.items()}
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

    def run(self) -> torch.fx.GraphModule:
        gm = self.gm
        new_graph, val_map, _ = copy_graph(gm.graph)
        self.patch_graph(val_map)
        for n in new_graph.nodes:
            for k in (keys.TENSOR_META, keys.VALUE, keys.FLOPS):
                n.meta.pop(k, None)
        new = DirectGraphModule(gm, new_graph, gm.__class__.__name__)
        copy_modes(gm, new)
        done: set[str] = set()
        for name in sorted({n.target for n in new_graph.nodes if n.op == "call_module"}):
            parent, _, field = name.rpartition(".")
            setattr(new.get_submodule(parent), field, self.copy_module(gm.get_submodule(name), name + "."))
            done.add(name)
        for n in new_graph.nodes:
            if n.op != "get_attr" or any(n.target.startswith(d + ".") for d in done):
                continue
            owner_name, _, field = n.target.rpartition(".")
            owner = new.get_submodule(owner_name)
            value = getattr(owner, field)
            if isinstance(value, torch.Tensor):
                t = self.new_tensor(n.target, value)
                if field in owner._parameters:
                    owner._parameters[field] = t
                elif field in owner._buffers:
                    owner._buffers[field] = t
                else:
                    setattr(owner, field, t)
        for p in self.deps.patches:
            if p.kind == PatchKind.ATTR:
                setattr(new.get_submodule(p.target), p.field, self.size(p))
        new.training = gm.training
        new.meta[keys.RECORD] = {"kept": self.kept_record()}
        return new

    def kept_record(self) -> dict[str, Any]:
        """JSON-ready record of kept indices, for every parameter/buffer (by dim; ``{}``: nothing removed)
        and every called module (its input and output channels)."""
        params: dict[str, dict[str, list[int]]] = {name: {} for name, _ in self.gm.state_dict().items()}
        for (name, dim), idx in self.kept.items():
            params.setdefault(name, {})[str(dim)] = idx.tolist()
        modules: dict[str, dict[str, list[int]]] = {}
        for n in self.gm.graph.nodes:
            if n.op != "call_module":
                continue
            mod, entry = self.gm.get_submodule(n.target), {}
            src = n.args[0] if n.args and isinstance(n.args[0], torch.fx.Node) else None
            for key, tensor, fields in (("in", src, IN_FIELDS), ("out", n, OUT_FIELDS)):
                atoms = self.deps.tensor_atoms.get(tensor.name) if tensor is not None else None
                if atoms is not None:
                    entry[key] = self.tensor_kept_masks[tensor.name].nonzero().flatten().tolist()
                elif (width := module_channels(mod, fields)) is not None:
                    entry[key] = list(range(width))
            modules[n.target] = entry
        return {"parameters": params, "modules": modules}


def rewrite(gm: torch.fx.GraphModule, deps: DependencyGraph, plan: Plan) -> torch.fx.GraphModule:
    """A new GraphModule that keeps only the atoms ``plan`` keeps; ``gm`` is left as it was."""
    return _Rewriter(gm, deps, plan).run()
