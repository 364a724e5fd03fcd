"""Dynamic dims for ``torch.export``: results that take any batch size.

``torch.export`` specializes every dim to the example's size unless told otherwise, so a graph captured
from a batch of 1 rejects a batch of 8 ("Guard failed: x.size()[0] == 1"). ``export`` asks for the batch
dim of every tensor input to stay symbolic, and the sequence dim of every token input (``wanted``). Sizes of 0 and
1 are not specialized (``backed_size_oblivious``) and are traced at 2, so an example of batch 1 still
gives a graph for any batch. A dim the model's code pins to one size (a
literal in a reshape, a check on it) stays static, and the note says which and why; export never fails
because of a dim it could not keep dynamic.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx.experimental._config as fx_config
from torch.export import Dim

__all__ = ["wanted", "export", "dynamic_dims", "describe", "size_arithmetic"]

_NOT_ONE = re.compile(r"L\['\w+'\]\.size\(\)\[(\d+)\] (?:!= 1|> 1|>= 2)")


def wanted(inputs: Sequence[Any]) -> dict[tuple[int, int], str]:
    """The dims to keep dynamic, ``(input index, dim) -> name``: dim 0 of every tensor input ("batch"), and
    dim 1 of every token input ("sequence": an integer or boolean tensor of two dims, token ids or a mask)."""
    dims = {(i, 0): "batch" for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and x.dim() >= 1}
    dims.update({(i, 1): "sequence" for i, x in enumerate(inputs) if _tokens(x)})
    return dims


def _tokens(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() == 2 and not (x.is_floating_point() or x.is_complex())


def _spec(inputs: Sequence[Any], dims: dict[tuple[int, int], str], hint: Any) -> tuple[Any, ...]:
    """``dynamic_shapes=`` for ``export``: ``hint`` on each wanted dim, None for other inputs."""
    return tuple({d: hint for (j, d) in dims if j == i} or None for i in range(len(inputs)))


def dynamic_dims(ep: torch.export.ExportedProgram) -> set[tuple[int, int]]:
    """The ``(input index, dim)`` pairs of ``ep``'s user inputs whose size is symbolic with no upper bound
    (a model that pins a dim leaves it a symbol whose range ends at the sizes its guards allow). Imports sympy here,
    not with fxprune: a third of a second that only an exported program's ranges need."""
    from torch.utils._sympy.numbers import int_oo

    names = [s.arg.name for s in ep.graph_signature.input_specs if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    vals = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    ranges = {str(k): v for k, v in ep.range_constraints.items()}
    return {(i, d) for i, name in enumerate(names) if isinstance(v := vals.get(name), torch.Tensor)
            for d, size in enumerate(v.shape) if isinstance(size, torch.SymInt)
            and (r := ranges.get(str(size.node.expr))) is not None and r.upper == int_oo}


def _why(exc: BaseException) -> str:
    """The lines of a failed dynamic export that say which dim was pinned and how, joined."""
    lines = [line.strip(" -") for line in str(exc).splitlines() if line.strip(" -")]
    said = [line for line in lines if "shape[" in line or "specialized" in line or "guard" in line.lower()]
    return "; ".join(said[:2] or lines[:1])[:300]


def describe(dims: dict[tuple[int, int], str], dynamic: set[tuple[int, int]], why: str) -> str:
    """``"dynamic dims: batch of input 1; static (...): batch of input 0 (why)"``."""
    name = {k: f"{v} of input {k[0]}" for k, v in dims.items()}
    kept = [name[k] for k in dims if k in dynamic]
    pinned = [name[k] for k in dims if k not in dynamic]
    text = f"dynamic dims: {', '.join(kept) or 'none'}"
    return text + (f"; static (inputs must have the example's size there): {', '.join(pinned)} ({why})"
                   if pinned else "")


def _widened(inputs: Sequence[Any], dims: dict[tuple[int, int], str]) -> tuple[Any, ...]:
    """``inputs`` with each wanted dim of size 0 or 1 repeated to 2, so that code testing ``size == 1``
    (a batch-of-one shortcut) takes the general path and leaves no guard that pins the dim."""
    out = list(inputs)
    for (i, d) in dims:
        if out[i].shape[d] < 2:
            rows = out[i] if out[i].shape[d] else torch.zeros_like(out[i].narrow(d, 0, 0)).expand(*out[i].shape[:d], 1, *out[i].shape[d + 1:])
            out[i] = torch.cat([rows, rows], d)
    return tuple(out)


def _unpin_one(ep: torch.export.ExportedProgram, inputs: Sequence[Any], free: dict[tuple[int, int], str]) -> None:
    """Drop the guards ``size != 1`` (``> 1``, ``>= 2``) on the dims ``_widened`` grew from 1: they record that the traced
    (general) path is not the batch-of-one shortcut, which computes the same, and would refuse the example itself."""
    grown = {d for (i, d) in free if inputs[i].shape[d] < 2}
    ep._guards_code = [g for g in getattr(ep, "_guards_code", [])
                       if not ((m := _NOT_ONE.fullmatch(g)) and int(m.group(1)) in grown)]


def _guards(ep: torch.export.ExportedProgram) -> str:
    return "; ".join(getattr(ep, "_guards_code", []))[:300] or "a guard in the model's code"


def size_arithmetic(ep: torch.export.ExportedProgram) -> bool:
    """Whether ``ep`` computes with a symbolic size (``batch * heads`` for a reshape) rather than only reading it."""
    return any(n.op == "call_function" and n.target is not torch.ops.aten.sym_size.int and isinstance(n.meta.get("val"), torch.SymInt)
               for n in ep.graph.nodes)


def export(module: torch.nn.Module, inputs: Sequence[Any], strict: bool = False,
           arithmetic: bool = True) -> tuple[torch.export.ExportedProgram, str]:
    """``torch.export.export(module, inputs)`` with the ``wanted`` dims dynamic where the model allows,
    and a note that says which are (``describe``). A dim the model pins is left out and the others are
    tried again (once); static shapes last: export never fails for a dim. ``arithmetic=False``: static
    also where the program computes with a symbolic size (``size_arithmetic``), for graphs to prune."""
    dims = wanted(inputs)
    batch = {k: v for k, v in dims.items() if v == "batch"}
    trying = [dims] + ([batch] if batch != dims else [])  # the batch alone when the sequence cannot be dynamic
    why = ""
    with fx_config.patch(backed_size_oblivious=True):
        while trying:
            free = trying.pop(0)
            if not free:
                continue
            try:
                ep = torch.export.export(module, _widened(inputs, free), dynamic_shapes=_spec(inputs, free, Dim.DYNAMIC), strict=strict)
            except Exception as exc:  # a dim the model pins, or an export failure of any kind: try fewer dims
                why = why or _why(exc)
                continue
            _unpin_one(ep, inputs, free)
            kept = dynamic_dims(ep) & free.keys()
            if kept == free.keys() and not arithmetic and size_arithmetic(ep):
                why = why or (f"with the {' and '.join(dict.fromkeys(free.values()))} dynamic, a size enters shape arithmetic (a size x heads "
                              "in a reshape), whose literals the rewrite cannot patch yet")
                continue
            if kept == free.keys():
                return ep, describe(dims, kept, why)
            why = why or _guards(ep)
            if kept:
                trying.insert(0, {k: v for k, v in free.items() if k in kept})
    return torch.export.export(module, tuple(inputs), strict=strict), describe(dims, set(), why or "no tensor inputs")
