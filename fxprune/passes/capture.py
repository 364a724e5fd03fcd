"""capture: ``nn.Module`` -> ``torch.fx.GraphModule``.

The model is copied structurally first (new module objects that share the user's tensors), so nothing
done to the graph or to module attributes afterwards can reach the user's model. Tracing follows
``torch.fx.symbolic_trace``'s rules. Fallback: a submodule whose forward cannot be traced symbolically
(data-dependent control flow, unsupported Python) is kept as one opaque call instead; the coupling pass
then freezes every channel it touches. The names of such modules are listed in
``gm.meta["fxprune_opaque"]`` and shown in the report.
"""

from __future__ import annotations

import copy
import traceback
from typing import Any

import torch
import torch.fx
from torch import nn

from ..errors import TraceError

__all__ = ["capture", "structural_copy"]

_MAX_OPAQUE = 64


def structural_copy(module: nn.Module, memo: dict[int, nn.Module] | None = None) -> nn.Module:
    """A new module tree with the same classes and attributes; tensors are shared, not copied.

    Shared submodules stay shared (one copy per original object).
    """
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    new = copy.copy(module)
    memo[id(module)] = new
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = {
        name: None if child is None else structural_copy(child, memo)
        for name, child in module._modules.items()
    }
    return new


class _Tracer(torch.fx.Tracer):
    """symbolic_trace's tracer that also treats the modules in ``opaque`` as leaves and remembers which
    module was being traced when tracing failed."""

    def __init__(self, opaque: set[str]) -> None:
        super().__init__()
        self.opaque = opaque
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.opaque or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.path_of_module(m)
            raise


def _user_frame(exc: BaseException) -> str:
    """The innermost stack frame outside torch's own code, as 'file:line: source'."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename]
    if not frames:
        return "<unknown location>"
    f = frames[-1]
    return f"{f.filename}:{f.lineno}: {f.line}"


def capture(model: nn.Module) -> torch.fx.GraphModule:
    """Trace a structural copy of ``model``; untraceable submodules become opaque leaves."""
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected a torch.nn.Module, got {type(model).__name__}")
    root = structural_copy(model)
    opaque: set[str] = set()
    while True:
        tracer = _Tracer(opaque)
        try:
            graph = tracer.trace(root)
        except Exception as exc:
            where = tracer.failed_in
            if where and where not in opaque and len(opaque) < _MAX_OPAQUE:
                opaque.add(where)
                continue
            raise TraceError(
                f"torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {exc}\n"
                f"  at {_user_frame(exc)}\n"
                "  hint: move data-dependent control flow into a submodule (it is then kept opaque and "
                "its channels frozen), or wrap the function with torch.fx.wrap."
            ) from exc
        break
    gm = torch.fx.GraphModule(tracer.root, graph, model.__class__.__name__)
    gm.meta["fxprune_opaque"] = sorted(opaque)
    return gm
