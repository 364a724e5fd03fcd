"""The coupling interpreter: runs a shape-annotated graph on channel labels instead of tensors.

Every node's rule is looked up in ``RULES`` (module types along their MRO, functions, Tensor method
names; aten ops through ``optable.canonical``), which each rule module fills where its rules are written
(``state.handles``); a node nothing names gets ``rules.unknown``. A rule
that meets a use of its op it does not handle raises ``Unsupported``, and the node's labels are
frozen with the message as the reason. Any other exception is a bug and propagates as a
``RuleError`` naming the node and the rule.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.fx

from ...core import metakeys as keys
from ...errors import ArgumentError
from ...core.fxutil import module_stack
from ...core.optable import canonical
from . import attention, contract, layout, literals, norms, rules, wrapped  # noqa: F401 - each registers its rules
from .state import BY_NAME, RULES, Rule, State, Unsupported

__all__ = ["RULES", "BY_NAME", "Coupler", "RuleError"]

GRAPH: dict[str, Rule] = {"placeholder": rules.placeholder, "get_attr": rules.get_attr, "output": rules.output}
CALLS = ("call_function", "call_method", "call_module")


class RuleError(RuntimeError):
    """A coupling rule failed: a bug in fxprune, not a property of the model."""


def _modules_of(n: torch.fx.Node) -> list[str]:
    """Qualified names of the modules whose work ``n`` is part of: the module it calls, the modules on its
    recorded module stack (tracing and torch.export record one), and the owners of the parameters and
    buffers it reads (all an ops-run capture, which records no stack, knows of a function's module)."""
    if n.op == "call_module":
        return [str(n.target)]
    return [path for path, _ in module_stack(n)] + [str(a.target).rpartition(".")[0] for a in n.all_input_nodes if a.op == "get_attr"]


def ignored_nodes(gm: torch.fx.GraphModule, ignore: Iterable[str]) -> dict[torch.fx.Node, str]:
    """The calls inside a module named in ``ignore`` (or below it), each with that name. A name that no
    call is part of is an error: it would keep nothing, silently."""
    found: dict[torch.fx.Node, str] = {}
    seen = dict.fromkeys(ignore, False)
    for n in gm.graph.nodes:
        if n.op not in CALLS:
            continue
        inside = [p for p in seen if any(m == p or m.startswith(p + ".") for m in _modules_of(n))]
        for p in inside:
            seen[p] = True
        if inside:
            found[n] = inside[0]
    missing = [p for p, hit in seen.items() if not hit]
    if missing:
        raise ArgumentError(f"ignore= names {', '.join(map(repr, missing))}, but no op of the captured graph belongs to it: a module the "
                            "forward never calls, or, in a graph of the ops one run executed (detectors), a module without parameters, "
                            "since an op is known to belong to a module there only by the parameters it reads. Name a module with "
                            "parameters whose output channels must stay (a conv, a linear, a norm), or one around it")
    return found


class Coupler(torch.fx.Interpreter):
    """Runs the graph with each node's rule; every value is ``Labels``, a ``Param`` or a plain value."""

    def __init__(self, gm: torch.fx.GraphModule, state: State, ignore: Iterable[str]) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.extra_traceback = False
        self.state = state
        self.ignored = ignored_nodes(gm, ignore)

    def rule(self, n: torch.fx.Node) -> Rule:
        if n.op == "call_module":
            types = type(self.submodules[n.target]).__mro__
            return next((RULES[t] for t in types if t in RULES), rules.unknown)
        if n.op in CALLS:
            t = canonical(n.target)
            return RULES.get(t) or BY_NAME.get(getattr(t, "__name__", ""), rules.unknown)
        return GRAPH[n.op]

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.op in CALLS and keys.TENSOR_META not in n.meta:
            return n.meta.get(keys.VALUE)  # a size or a dtype: rules replay shape arithmetic with it
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        rule = self.rule(n)
        try:
            out = rule(self.state, n, args, kwargs)
        except Unsupported as exc:
            out = self.state.unsupported(n, args, kwargs, str(exc))
        except Exception as exc:
            raise RuleError(f"coupling rule {rule.__name__} failed at node {n.format_node()}: {type(exc).__name__}: {exc}") from exc
        if n in self.ignored:
            self.state.freeze(out, f"module {self.ignored[n]} is in ignore=")
        return out
