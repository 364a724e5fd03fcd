"""The layers of a captured graph in data-flow order, named as the user's modules are.

A *layer* is a graph node that owns parameters or does counted work (conv, linear, norm, matmul): a
module call, or a function that reads parameters or does counted work (``torch.export`` graphs,
functional code). Its name is the module's qualified name: the module called, else the module owning
every parameter it reads, else the innermost module of ``node.meta["nn_module_stack"]`` (tracing and
torch.export record it), else the node's own name. A function that shares its name with another layer
gets ``:<node name>`` appended (``encoder.attn:matmul_1``), so names are unique except for a module
called twice. The report's rows and the drawings of the dependency groups both use these names.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from . import metakeys as keys
from .fxutil import module_stack, modules_of, tensors_of
from .groups import DependencyGraph
from .optable import canonical

__all__ = ["Block", "layers", "function_name", "read_params", "channel_count", "blocks"]


def _innermost(node: torch.fx.Node) -> tuple[str, Any]:
    """(qualified name, class or its dotted name) of the innermost module on ``node``'s recorded module
    stack; ("", None) when none is recorded or it is the root."""
    stack = module_stack(node)
    return stack[-1] if stack else ("", None)


def _owner(node: torch.fx.Node) -> str:
    """The module owning every parameter or buffer ``node`` reads directly ("" for none, several, or the root)."""
    owners = {str(n.target).rpartition(".")[0] for n in node.all_input_nodes if n.op == "get_attr"}
    return owners.pop() if len(owners) == 1 else ""


def function_name(node: torch.fx.Node) -> str:
    """The name of the function or method ``node`` calls (an aten op by the torch function it stands for)."""
    target = canonical(node.target)
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _name_and_op(node: torch.fx.Node, modules: dict[str, torch.nn.Module]) -> tuple[str, str]:
    """A layer's module name and op: a torch.nn class (``Conv2d``) when the node is all of that module's
    work (it reads that module's parameters: a conv of a ``torch.export`` graph), else the function's name."""
    if node.op == "call_module":
        return str(node.target), type(modules[node.target]).__name__
    owner, (path, cls) = _owner(node), _innermost(node)
    dotted = f"{cls.__module__}.{cls.__qualname__}" if isinstance(cls, type) else str(cls)
    standard = bool(owner) and owner == path and dotted.startswith("torch.nn.")
    return owner or path or node.name, dotted.rsplit(".", 1)[-1] if standard else function_name(node)


def read_params(node: torch.fx.Node, params: dict[str, torch.nn.Parameter]) -> list[str]:
    """Qualified names of the parameters (of ``params``, a ``named_parameters`` dict) a call reads directly."""
    return [n.target for n in node.all_input_nodes if n.op == "get_attr" and n.target in params]  # type: ignore[misc]


def _is_layer(node: torch.fx.Node, modules: dict[str, torch.nn.Module], params: dict[str, torch.nn.Parameter]) -> bool:
    if node.op == "call_module":
        return bool(tensors_of(modules[node.target])) or bool(node.meta.get(keys.FLOPS))
    if node.op in ("call_function", "call_method"):
        return bool(node.meta.get(keys.FLOPS)) or bool(read_params(node, params))
    return False


def layers(gm: torch.fx.GraphModule, modules: dict[str, torch.nn.Module] | None = None) -> dict[torch.fx.Node, tuple[str, str]]:
    """Every layer node of ``gm``, in graph order, with its (name, op); ``modules``: ``modules_of(gm)``
    when the caller has it."""
    modules = modules_of(gm) if modules is None else modules
    params = tensors_of(gm, modules=modules)
    found = {n: _name_and_op(n, modules) for n in gm.graph.nodes if _is_layer(n, modules, params)}
    uses = Counter(name for name, _ in found.values())
    called = {name for n, (name, _) in found.items() if n.op == "call_module"}
    for n, (name, op) in found.items():
        if n.op != "call_module" and name != n.name and (uses[name] > 1 or name in called):
            found[n] = (f"{name}:{n.name}", op)
    return found


def channel_count(node: torch.fx.Node, deps: DependencyGraph) -> int | None:
    """Channels of ``node``'s output along the dim the coupling pass tracks (None when it tracks none)."""
    entry = deps.tensor_atoms.get(node.name)
    if entry is not None:
        return int(entry[1].numel())
    meta = node.meta.get(keys.TENSOR_META)
    if node.op == "placeholder" and meta is not None and len(meta.shape) >= 2:
        return int(meta.shape[1])  # an input is one frozen label; its channels are dim 1 by convention
    return None


@dataclass(frozen=True)
class Block:
    """One box of a data-flow drawing: a model input, a layer, or a join where tensors from different
    layers meet (a residual add, a gate's multiply, a concatenation)."""

    name: str
    kind: str  # "input", "layer" or "join"
    op: str
    width: int | None  # output channels
    groups: tuple[int, ...]  # the groups its output channels belong to, the most channels first
    preds: tuple[int, ...]  # indices of the blocks that feed it, through any number of other ops


def _groups(node: torch.fx.Node, deps: DependencyGraph) -> tuple[int, ...]:
    """Groups of ``node``'s output channels, the most channels first; a model input's from its frozen reason."""
    entry = deps.tensor_atoms.get(node.name)
    if entry is None:
        mark = f"model input {node.name}"  # an input is one frozen label, so it has no tensor atoms
        return tuple(g.id for g in deps.groups if mark in g.frozen) if node.op == "placeholder" else ()
    atoms = entry[1][entry[1] >= 0]
    if not atoms.numel():
        return ()
    ids, counts = torch.unique(deps.atom_group[atoms], return_counts=True)
    return tuple(int(ids[i]) for i in torch.argsort(counts, descending=True, stable=True))


def blocks(gm: torch.fx.GraphModule, deps: DependencyGraph) -> list[Block]:
    """The inputs, layers and joins of ``gm`` in topological order, each with the blocks that feed it."""
    named = layers(gm)
    out: list[Block] = []
    reach: dict[torch.fx.Node, frozenset[int]] = {}  # node -> the blocks whose output reaches it unchanged
    for node in gm.graph.nodes:
        feeds = [reach.get(n, frozenset()) for n in node.all_input_nodes]
        preds = frozenset().union(*feeds)
        if node.op == "placeholder" and keys.TENSOR_META in node.meta:
            kind, name, op = "input", node.name, "input"
        elif node in named:
            kind, (name, op) = "layer", named[node]
        elif node.op != "output" and len({f for f in feeds if f}) > 1:
            kind, name, op = "join", node.name, function_name(node)
        else:
            reach[node] = preds
            continue
        reach[node] = frozenset({len(out)})
        out.append(Block(name, kind, op, channel_count(node, deps), _groups(node, deps), tuple(sorted(preds))))
    return out
