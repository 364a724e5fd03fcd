"""shapes: record each node's output shape, dtype and FLOPs in ``node.meta``, for the later passes.

A graph whose every op has a shape rule (``core/shaperules.py``: convolutions, norms, activations, pools,
linear layers, elementwise arithmetic, the shape ops) is annotated from the rules, without running it.
Any other graph runs once: ``torch.fx.passes.shape_prop.ShapeProp`` (``meta["tensor_meta"]``), adding per node:
``meta["fxprune_value"]`` for non-tensor results (sizes, ints) so the coupling pass can replay shape
arithmetic, and ``meta["fxprune_flops"]``: the FLOPs that ``torch.utils.flop_counter.FlopCounterMode``
counts while that node runs. The graph runs in eval mode under ``torch.no_grad`` so BatchNorm running
statistics are never updated.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata, _extract_tensor_metadata
from torch import nn

from ..core import metakeys as keys
from ..errors import ShapeError
from ..core.flops import counter as flop_counter
from ..core.fxutil import eval_mode, modules_of
from ..core.optable import flopless
from ..core.shaperules import infer

__all__ = ["propagate_shapes"]


class _ShapeFlopProp(ShapeProp):
    """ShapeProp that also records non-tensor results and per-node FLOPs.

    Each node gets ShapeProp's ``tensor_meta`` and ``type`` without its memory-format probe (three
    ``is_contiguous`` queries through symbolic-shape guards, about 10 us a tensor; no pass here reads it).
    """

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm)
        self.modules = dict(gm.named_modules())
        self.at: torch.fx.Node | None = None  # the node being run, named when running fails

    def run_node(self, n: torch.fx.Node) -> Any:
        self.at = n
        mod = self.modules.get(n.target) if n.op == "call_module" else None
        # Fake inputs (a torch.compile backend's) take ShapeProp's own path, which runs a fake copy of the module.
        execute = ShapeProp.run_node if self.fake_mode is not None else torch.fx.Interpreter.run_node
        if flopless(n, self.modules):
            result = execute(self, n)
            n.meta[keys.FLOPS] = 0
        elif (flops := _formula(n, mod)) is not None:
            result = execute(self, n)
            n.meta[keys.FLOPS] = flops(result)
        else:
            with flop_counter() as counter:
                result = execute(self, n)
            n.meta[keys.FLOPS] = counter.get_total_flops()
        found = isinstance(result, torch.Tensor)

        def tensor_meta(obj: Any) -> Any:
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return _extract_tensor_metadata(obj, include_contiguity=False)
            return obj

        meta = _extract_tensor_metadata(result, include_contiguity=False) if found else map_aggregate(result, tensor_meta)
        if found:
            n.meta[keys.TENSOR_META] = meta
        else:
            n.meta[keys.VALUE] = result
        n.meta["type"] = type(result)
        return result


def _formula(n: torch.fx.Node, mod: nn.Module | None) -> Callable[[torch.Tensor], int] | None:
    """FlopCounterMode's own count for a conv or linear module, as a function of its output, without the
    cost of dispatching through the mode; None for any other node."""
    x = n.args[0].meta.get(keys.TENSOR_META) if n.args and isinstance(n.args[0], torch.fx.Node) else None
    if x is None:
        return None
    if isinstance(mod, nn.modules.conv._ConvNd) and len(x.shape) == mod.weight.dim():
        from torch.utils.flop_counter import conv_flop_count  # not with fxprune: see ``flops.counter``

        return lambda out: conv_flop_count(list(x.shape), list(mod.weight.shape), list(out.shape), mod.transposed)
    if isinstance(mod, nn.Linear):
        return lambda out: 2 * math.prod(x.shape) * mod.out_features
    return None


def _annotate(modules: dict[str, nn.Module], outputs: dict[torch.fx.Node, Any], counted: dict[torch.fx.Node, int]) -> None:
    """Write what ``infer`` found as ``_ShapeFlopProp`` writes what it runs (``modules``: the graph module's table)."""
    for n, out in outputs.items():
        found = isinstance(out, TensorMetadata) or (isinstance(out, (tuple, list)) and any(isinstance(v, TensorMetadata) for v in out))
        n.meta[keys.TENSOR_META if found else keys.VALUE] = out
        n.meta["type"] = torch.Tensor if isinstance(out, TensorMetadata) else type(out)
        flops = _formula(n, modules.get(n.target) if n.op == "call_module" else None)
        n.meta[keys.FLOPS] = counted[n] if n in counted else flops(out) if flops is not None else 0  # the rules' other ops count nothing


def propagate_shapes(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], modules: dict[str, nn.Module] | None = None) -> None:
    """Annotate ``gm`` in place for ``example_inputs``: from the shape rules, or by running it.
    ``modules``: ``modules_of(gm)`` when the caller has it."""
    for node in gm.graph.nodes:
        node.meta.pop(keys.TENSOR_META, None)
        node.meta.pop(keys.VALUE, None)
    modules = modules_of(gm) if modules is None else modules
    inferred = infer(gm, example_inputs, modules)
    if inferred is not None:
        _annotate(modules, *inferred)
        return
    prop = _ShapeFlopProp(gm)
    try:
        with torch.no_grad(), eval_mode(gm), contextlib.redirect_stderr(io.StringIO()):
            prop.propagate(*example_inputs)
    except RuntimeError as exc:
        cause = str(exc.__cause__ or exc).strip().splitlines()[0]
        given = ", ".join(f"{list(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__ for t in example_inputs)
        n = prop.at
        where = f" at node {n.name} ({n.op} {n.target if isinstance(n.target, str) else getattr(n.target, '__name__', n.target)})" if n is not None else ""
        raise ShapeError(
            f"running the captured graph on the example inputs ({given}) failed{where}\n  cause: {cause}\n"
            "  hint: pass example_inputs= (on the command line: --input-shape) with the shapes and dtypes the model expects"
        ) from exc
