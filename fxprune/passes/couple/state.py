"""What the coupling pass learns about a graph's channels while it walks the graph.

Rules read the labels of their inputs from a ``State`` and record what they find there: merged
labels (the union-find), parameter slots, frozen labels and why, patches, FLOP terms, contraction
inputs, notes, op families and norms with masked statistics. ``grouping.finalize`` turns it into a
DependencyGraph.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx.node import map_aggregate, map_arg
from torch.fx.passes.shape_prop import TensorMetadata

from ...core import metakeys as keys
from ...core.fxutil import modules_of
from ...core.groups import Family, Member, Patch, Role
from ...core.optable import ATTENTION_PRODUCTS, canonical
from .labels import Labels, Param, UnionFind

__all__ = ["Unsupported", "Rule", "State", "family", "owner", "target_name"]

Rule = Callable[["State", torch.fx.Node, tuple[Any, ...], dict[str, Any]], Any]


class Unsupported(Exception):
    """A rule met a use of its op that it does not handle (odd arguments, computed sizes ...).

    The driver freezes every label the node touches, with the message as the reason: a frozen group
    costs some FLOPs, a wrong guess costs a broken model.
    """


RULES: dict[Any, Rule] = {}
"""The rule of each module type, function and Tensor method name, filled by ``handles`` where each rule is written."""

BY_NAME: dict[str, Rule] = {}
"""Rules of functions that libraries keep as leaves of a traced graph, by ``__name__``."""


def handles(*ops: Any, by_name: tuple[str, ...] = ()) -> Callable[[Rule], Rule]:
    """Register the decorated rule for ``ops`` (module types, functions, Tensor method names, or sets of
    them, as ``core.optable`` holds them; aten ops reach it through ``optable.canonical``) and for the
    library leaf functions named ``by_name``. An op with two rules is an error at import."""

    def register(fn: Rule) -> Rule:
        for op in ops:
            for one in op if isinstance(op, (set, frozenset, tuple, dict)) else (op,):
                if one in RULES:
                    raise ValueError(f"{one!r} has two coupling rules: {RULES[one].__name__} and {fn.__name__}")
                RULES[one] = fn
        BY_NAME.update(dict.fromkeys(by_name, fn))
        return fn

    return register


def family(kind: Family) -> Callable[[Rule], Rule]:
    """Decorate a rule so that the nodes it handles are recorded as op family ``kind``."""

    def mark(fn: Rule) -> Rule:
        @functools.wraps(fn)
        def rule(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            s.families[node.name] = kind
            return fn(s, node, args, kwargs)

        return rule

    return mark


def owner(node: torch.fx.Node) -> str:
    """Whose parameters a call uses: the module a call_module runs, else the node itself."""
    return node.target if node.op == "call_module" else node.name


def target_name(node: torch.fx.Node) -> str:
    t = canonical(node.target)
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


class State:
    """The union-find over labels and everything the rules record about a GraphModule's channels."""

    def __init__(self, gm: torch.fx.GraphModule, free_output: bool, modules: dict[str, nn.Module] | None = None) -> None:
        self.gm = gm
        self.free_output = free_output
        self.modules = modules_of(gm) if modules is None else modules
        self.uf = UnionFind()
        self.env: dict[torch.fx.Node, Any] = {}  # the interpreter's: node -> Labels / Param / value
        self.slots: dict[tuple[str, int], list[torch.Tensor]] = defaultdict(list)
        self.members: dict[tuple[str, int], Member] = {}
        self.frozen: list[tuple[torch.Tensor, str]] = []  # labels that cannot be removed, and why
        self.constants: dict[tuple[torch.fx.Node, int], Any] = {}  # memo of literals.constant
        self.notes: dict[str, str] = {}
        self.masked_norms: list[str] = []
        self.patches: list[Patch] = []
        self.flop_terms: list[tuple[str, int, list[torch.Tensor]]] = []
        self.consumers: list[tuple[str, int | tuple[int, int], int]] = []
        self.param_labels: dict[str, Labels] = {}
        self.buffer_slots: list[tuple[str, int, torch.Tensor]] = []  # bound in ``grouping`` only where they meet channels
        self.table_ids: set[int] = set()  # labels of parameters and buffers read as data
        self.families: dict[str, Family] = {}

    @functools.cached_property
    def parameters(self) -> set[str]:
        """The qualified names of the graph module's parameters (asked only when one is read as data)."""
        return {name for name, _ in self.gm.named_parameters(remove_duplicate=False)}

    @functools.cached_property
    def attention(self) -> bool:
        """Whether the graph has an attention product (matmul, bmm, einsum, scaled dot-product attention)."""
        return any(canonical(n.target) in ATTENTION_PRODUCTS for n in self.gm.graph.nodes)  # as feeds_attention tests users

    def module(self, node: torch.fx.Node) -> nn.Module | None:
        """The module a call_module node runs; None for other nodes."""
        return self.modules[node.target] if node.op == "call_module" else None

    def shape(self, node: torch.fx.Node) -> tuple[int, ...]:
        return tuple(node.meta[keys.TENSOR_META].shape)

    def value(self, a: Any) -> Any:
        """``a`` (a node argument) with every node replaced by its value."""
        return map_arg(a, lambda n: self.env[n])

    def as_labels(self, v: Any, positions: frozenset[int] = frozenset()) -> Any:
        """Labels for a tensor value; parameters get labels along their last non-singleton dim, integer
        and boolean buffers (indices, masks) one label: they hold no channels. A floating-point buffer
        gets labels too, but holds channels only where they meet a parameter's (``grouping.finalize``):
        a rotary embedding's frequencies hold positions within a head. ``positions``: dims that the first
        use reads by position (a relative-position table gathered by index), so they hold no channels."""
        if not isinstance(v, Param):
            return v
        if v.transposed:
            lab = self.as_labels(Param(v.name, v.tensor))
            return Labels(lab.shape[::-1], None if lab.dim is None else 1 - lab.dim, lab.ids)
        if v.name in self.param_labels:
            return self.param_labels[v.name]
        shape = tuple(v.tensor.shape)
        dims = [d for d, size in enumerate(shape) if size > 1 and d not in positions]
        if not dims or not (v.tensor.is_floating_point() or v.tensor.is_complex()):  # index tables are no channels
            lab = Labels(shape, None, self.uf.fresh(1))
        else:
            lab = Labels(shape, dims[-1], self.uf.fresh(shape[dims[-1]]))
            if v.name in self.parameters:
                self.bind(v.name, dims[-1], lab.ids, v.name.rpartition(".")[0] or v.name, Role.PARAM)
            else:
                self.buffer_slots.append((v.name, dims[-1], lab.ids))
            self.table_ids.update(lab.ids.tolist())
        self.param_labels[v.name] = lab
        return lab

    def is_table(self, lab: Labels) -> bool:
        """True when ``lab``'s labels all come from parameters or buffers read as data (a rotary embedding's
        frequencies, a per-head norm's weight over head_dim) and meet no producer's channels so far."""
        return bool(self.table_ids) and lab.dim is not None and set(self.uf.roots(lab.ids).tolist()) <= self.table_ids

    def labels(self, v: Any, node: torch.fx.Node) -> Labels:
        """Labels of a value that ``node`` needs to be a tensor."""
        v = self.as_labels(v)
        if not isinstance(v, Labels):
            raise Unsupported(f"node {node.name} reads a {type(v).__name__} where a tensor is expected")
        return v

    def input_of(self, node: torch.fx.Node, at: int = 0) -> tuple[torch.fx.Node, Labels]:
        """The node a call reads its tensor from (its positional argument ``at``, the first by default) and its labels."""
        src = node.args[at] if len(node.args) > at else None
        if not isinstance(src, torch.fx.Node):
            raise Unsupported(f"node {node.name} takes its input by keyword or as a constant")
        return src, self.labels(self.env[src], node)

    def full(self, lab: Labels) -> torch.Tensor:
        """The label tensor of ``lab``, with every label replaced by its current root."""
        return Labels(lab.shape, lab.dim, self.uf.roots(lab.ids)).full()

    def freeze(self, value: Any, reason: str) -> None:
        """Mark every label in ``value`` (any nesting of labels and parameters) as never removed."""

        def visit(v: Any) -> Any:
            v = self.as_labels(v)
            if isinstance(v, Labels):
                self.frozen.append((v.ids.reshape(-1), reason))
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
                return type(meta)(*map(make, meta)) if hasattr(meta, "_fields") else type(meta)(make(m) for m in meta)
            if isinstance(meta, dict):
                return {k: make(v) for k, v in meta.items()}
            return meta

        return make(node.meta.get(keys.TENSOR_META))

    def unsupported(self, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any], reason: str) -> Any:
        """Freeze everything ``node`` reads and return frozen labels for its output."""
        self.families[node.name] = Family.UNKNOWN
        self.freeze((args, kwargs), reason)
        return self.frozen_like(node, reason)

    def bind(self, name: str, dim: int, ids: torch.Tensor, module: str, role: Role) -> None:
        """Index i of parameter ``name`` along ``dim`` carries label ``ids[i]``."""
        self.slots[(name, dim)].append(ids)
        self.members.setdefault((name, dim), Member(name, dim, module, role))

    def flops(self, node: torch.fx.Node, factors: list[torch.Tensor]) -> None:
        """Record ``node``'s MACs as scaling with the kept share of each label vector in ``factors``."""
        f = int(node.meta.get(keys.FLOPS, 0))
        if f:
            self.flop_terms.append((node.name, f // 2, factors))

    def mask_norm(self, node: torch.fx.Node, note: str) -> None:
        """``node`` normalizes over pruned channels: verification masks its statistics, the user is told."""
        self.notes[node.name] = note
        self.masked_norms.append(node.name)
