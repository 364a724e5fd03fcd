"""The ``fxprune`` torch.compile backend: prune the captured graph, then hand it to inductor.

    fast = torch.compile(model.eval(), backend="fxprune", options={"ratio": 0.5})
    with torch.inference_mode():
        fast(x)

Dynamo passes a graph whose parameters and buffers are inputs. The backend turns them into constants
of a new module (the weights are frozen: this is for inference), prunes that with ``fxprune.compile``
(same options: ``target_gflops`` or ``ratio``, ``verify``, ``ignore`` and the ``Strategy`` fields), compiles the result
with inductor and returns a function that ignores the weight inputs. A FLOPs target applies to each
captured graph separately, so with graph breaks prefer ``ratio``. Graphs that train (BatchNorm or
dropout in training mode, weights that require grad under grad mode) are refused with a clear error.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from . import api
from .errors import ArgumentError
from .targets import Target
from .selection.strategy import Strategy

__all__ = ["fxprune_backend"]

_SOURCE = re.compile(r"\._(modules|parameters|buffers)\['([^']+)'\]")
_OPTIONS = {*Target.keywords(measured=False), "verify", "ignore", *Strategy.option_names()}
_TRAINING_FLAG = {F.batch_norm: (5, "training"), F.dropout: (2, "training"), F.instance_norm: (5, "use_input_stats")}


def _refuse_training(gm: torch.fx.GraphModule, inputs: Sequence[Any], weights: dict[int, str]) -> None:
    hint = ("the fxprune backend prunes for inference: call model.eval() and run it under torch.no_grad() or "
            "torch.inference_mode(); to prune a model you will train, use fxprune.compile ahead of time")
    if torch.is_grad_enabled() and any(inputs[i].requires_grad for i in weights):
        raise ArgumentError(f"torch.compile(backend='fxprune'): the weights require grad; {hint}")
    for node in gm.graph.nodes:
        flag = _TRAINING_FLAG.get(node.target)
        if node.op == "call_function" and flag is not None:
            pos, name = flag
            value = node.args[pos] if len(node.args) > pos else node.kwargs.get(name, False)
            if value is True and node.target is not F.instance_norm:
                raise ArgumentError(f"torch.compile(backend='fxprune'): node {node.name} ({node.target.__name__}) runs in training mode; {hint}")


def _weight_name(node: torch.fx.Node) -> str | None:
    """Qualified name of the parameter or buffer a dynamo placeholder reads, or None for a real input."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    parts = _SOURCE.findall(getattr(source, "name", "") or "")
    if not parts or parts[-1][0] == "modules":
        return None
    return ".".join(name for _, name in parts)


def _with_constant_weights(gm: torch.fx.GraphModule, inputs: Sequence[Any], weights: dict[int, str]) -> torch.fx.GraphModule:
    """A copy of ``gm`` where the weight inputs are attributes (named after their qualified names)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    root = nn.Module()
    graph = torch.fx.Graph()
    val_map: dict[torch.fx.Node, torch.fx.Node] = {}
    for i, node in enumerate(placeholders):
        if i in weights:
            target = weights[i].replace(".", "_")
            value = inputs[i].detach()
            if isinstance(inputs[i], nn.Parameter):
                root.register_parameter(target, nn.Parameter(value, requires_grad=False))
            else:
                root.register_buffer(target, value)
            val_map[node] = graph.get_attr(target)
        else:
            val_map[node] = graph.placeholder(node.name)
    graph.output(graph.graph_copy(gm.graph, val_map))
    for node in list(graph.nodes):
        if node.op == "placeholder" and node not in val_map.values():
            graph.erase_node(node)
    return torch.fx.GraphModule(root, graph)


def fxprune_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], options: dict[str, Any] | None = None) -> Callable[..., Any]:
    """torch.compile backend: ``torch.compile(model, backend="fxprune", options={"ratio": 0.5})``."""
    options = dict(options or {})
    unknown = set(options) - _OPTIONS
    if unknown:
        raise ArgumentError(f"torch.compile(backend='fxprune'): unknown option(s) {sorted(unknown)}; known: {sorted(_OPTIONS)}")
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    weights = {i: name for i, n in enumerate(placeholders) if (name := _weight_name(n)) is not None}
    _refuse_training(gm, example_inputs, weights)
    data = [i for i in range(len(placeholders)) if i not in weights]
    model = _with_constant_weights(gm, example_inputs, weights)
    inputs = [example_inputs[i] for i in data]
    with torch.no_grad():
        pruned = api.compile(model, target_gflops=options.pop("target_gflops", None), example_inputs=inputs, **options)
    compiled = torch._inductor.compile(pruned, inputs)

    def run(*args: Any) -> Any:
        return compiled(*[args[i] for i in data])

    return run
