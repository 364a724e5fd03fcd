"""Module and graph helpers that several passes share; nothing here knows about channels.

* ``modules_of`` / ``tensors_of``: ``dict(named_modules())`` / ``dict(named_parameters())`` without generator chains;
* ``module_copy``: a shallow copy of one module with its own parameter, buffer, submodule and hook tables;
* ``structural_copy``: a new module tree sharing the user's tensors, so attribute edits never reach them;
* ``copy_graph``: a copy of a graph that keeps its codegen (an exported graph's input/output structure);
* ``graph_module``: a GraphModule over a new graph, borrowing the modules and tensors of another;
* ``eval_mode``: every submodule in eval mode for a while, each flag restored afterwards;
* ``is_get_attr``: whether a node argument reads a parameter or buffer of the graph module;
* ``arg``: a call's argument given by position or by keyword;
* ``module_stack``: the (qualified name, class) of each module a node's work is inside, outermost first;
* ``is_hf``: whether a model is a Hugging Face ``PreTrainedModel`` (transformers is never imported here);
* ``MMAP_MAX``: the size above which every tensor gets fresh pages from the kernel, which the rewrite's
  copies and the latency timings both pay.
"""

from __future__ import annotations

import contextlib
import copy
import operator
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx.node import map_arg

__all__ = ["modules_of", "tensors_of", "module_copy", "structural_copy", "copy_graph", "copy_modes", "graph_module", "eval_mode", "is_get_attr", "arg",
           "module_stack", "is_hf", "MMAP_MAX"]

MMAP_MAX = 32 << 20
"""glibc malloc's largest dynamic mmap threshold on 64-bit systems (``DEFAULT_MMAP_THRESHOLD_MAX``)."""


_TABLES = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")


def modules_of(root: nn.Module) -> dict[str, nn.Module]:
    """``dict(root.named_modules())``, walking the ``_modules`` tables: ``named_modules`` nests a generator
    per level (a few microseconds a module), and the passes ask for every module of a graph many times."""
    if not root._modules:  # a leaf (the report and the layer list ask for each layer's tensors)
        return {"": root}
    out: dict[str, nn.Module] = {}
    seen: set[int] = set()
    stack = [("", root)]
    while stack:
        name, m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        out[name] = m
        stack.extend((f"{name}.{k}" if name else k, c) for k, c in reversed(m._modules.items()) if c is not None)
    return out


def tensors_of(root: nn.Module, table: str = "_parameters", modules: dict[str, nn.Module] | None = None) -> dict[str, torch.Tensor]:
    """``dict(root.named_parameters())`` (``table="_buffers"``: ``named_buffers``), the same way;
    ``modules``: ``modules_of(root)`` when the caller has it."""
    if modules is None and not root._modules:  # a leaf (the report asks for each layer's): its own table
        own = {k: t for k, t in getattr(root, table).items() if t is not None}
        if len({id(t) for t in own.values()}) == len(own):
            return own
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for prefix, m in (modules_of(root) if modules is None else modules).items():
        for k, t in getattr(m, table).items():
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                out[f"{prefix}.{k}" if prefix else k] = t
    return out


def module_copy(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` (same class, same attribute values) with tables of its own: parameters,
    buffers, submodules, hooks and the names of non-persistent buffers, so that registering or replacing
    one never reaches ``module``."""
    cls = type(module)
    if hasattr(cls, "__copy__") or cls.__reduce_ex__ is not object.__reduce_ex__ or cls.__reduce__ is not object.__reduce__:
        new = copy.copy(module)  # a class with its own copy (a GraphModule builds its code anew)
    else:
        new = cls.__new__(cls)  # what copy.copy does, without its generic protocol
        new.__dict__.update(module.__dict__)
    for name, value in module.__dict__.items():
        if isinstance(value, (dict, set)) and (name in _TABLES or "hook" in name):
            new.__dict__[name] = value.copy()  # its own type (OrderedDict, dict): a third of the time of type(value)(value)
    return new


def structural_copy(module: nn.Module, memo: dict[int, nn.Module] | None = None) -> nn.Module:
    """A new module tree with the same classes and attributes; tensors are shared, not copied.

    Shared submodules stay shared (one copy per original object); hook tables are the copy's own.
    """
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    new = memo[id(module)] = module_copy(module)
    new.__dict__["_modules"] = {
        name: None if child is None else structural_copy(child, memo)
        for name, child in module._modules.items()
    }
    return new


def copy_graph(graph: torch.fx.Graph, drop_meta: frozenset[str] = frozenset()) -> tuple[torch.fx.Graph, dict[torch.fx.Node, torch.fx.Node], torch.fx.Node]:
    """A copy of ``graph`` with the same codegen, each node's ``meta`` without the keys in ``drop_meta``:
    (copy, old node -> new node, the copy's output node).

    Each node is created without arguments and given them after: ``Graph.create_node`` walks the
    arguments it is given with pytree to warn about raw symbolic values, which a copy of a checked graph
    cannot hold (ShuffleNetV2's 369 nodes: 3.3 ms with ``Graph.graph_copy``, 2.0 ms so)."""
    new = torch.fx.Graph()
    new._codegen = graph._codegen
    val_map: dict[torch.fx.Node, torch.fx.Node] = {}
    mapped = val_map.__getitem__
    out = graph.output_node()
    for node in graph.nodes:
        if node is out:
            break
        copied = new.create_node(node.op, node.target, None, None, node.name, node.type)
        if node.args:
            copied.args = map_arg(node.args, mapped)
        if node.kwargs:
            copied.kwargs = map_arg(node.kwargs, mapped)
        copied.meta = {k: v for k, v in node.meta.items() if k not in drop_meta} if drop_meta else copy.copy(node.meta)
        val_map[node] = copied
    return new, val_map, new.output(map_arg(out.args[0], mapped), type_expr=out.type)


def graph_module(source: torch.fx.GraphModule, graph: torch.fx.Graph, extra: dict[str, Any] | None = None) -> torch.fx.GraphModule:
    """A GraphModule running ``graph`` whose modules and attributes are ``source``'s own objects, plus
    ``extra`` (name -> module or tensor) for the targets ``graph`` adds."""
    attrs: dict[str, Any] = dict(extra or {})
    for n in graph.nodes:
        if n.op in ("call_module", "get_attr") and n.target not in attrs:
            attrs[n.target] = source.get_submodule(n.target) if n.op == "call_module" else operator.attrgetter(n.target)(source)
    gm = torch.fx.GraphModule(attrs, graph)
    copy_modes(source, gm)
    return gm


def copy_modes(source: nn.Module, target: nn.Module, modules: dict[str, nn.Module] | None = None) -> None:
    """Give every submodule of ``target`` the training flag of ``source``'s submodule of the same name
    (``source``'s own where it has none): FX builds a GraphModule's root and containers anew, in
    training mode, whatever mode the modules it copies are in. ``modules``: ``modules_of(source)``
    when the caller has it."""
    flags = {n: m.training for n, m in (modules_of(source) if modules is None else modules).items()}
    for n, m in modules_of(target).items():
        flag = flags.get(n, source.training)
        if m.training != flag:  # most are copies that have it already
            m.training = flag


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put every submodule of ``modules`` in eval mode for the duration, then restore each one's flag."""
    flags = [(m, m.training) for module in modules for m in module.modules()]
    for m, _ in flags:  # not module.eval(): exported modules refuse it (their mode is fixed at export)
        m.training = False
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def is_get_attr(arg: Any) -> bool:
    """True when a node argument is a ``get_attr`` node (a parameter or buffer read by name)."""
    return isinstance(arg, torch.fx.Node) and arg.op == "get_attr"


def arg(args: tuple[Any, ...], kwargs: dict[str, Any], i: int, name: str, default: Any = None) -> Any:
    """Argument ``i`` of a call, or keyword ``name``: from a node's own args or from their values."""
    return args[i] if len(args) > i else kwargs.get(name, default)


def module_stack(node: torch.fx.Node) -> list[tuple[str, Any]]:
    """(qualified name, class or its dotted name) of each module whose forward ``node`` ran inside,
    outermost first, as tracing and torch.export record them; empty when none is recorded."""
    return [tuple(entry) for entry in (node.meta.get("nn_module_stack") or {}).values()]  # type: ignore[misc]


def is_hf(model: Any) -> bool:
    """True for a ``transformers.PreTrainedModel`` (without importing transformers when it is not loaded)."""
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.") for c in type(model).__mro__)
