"""transplant: the rewrite of an ops-run capture -> a pruned copy of the module tree that ran.

Such a graph records one run of the model on its example inputs (sizes and Python branches fixed), so
it cannot be the result. Its rewrite holds every pruned parameter and buffer under its qualified name;
a copy of the module tree takes those tensors, and each module's size attributes (``out_channels``,
``num_features``, ``groups`` ...) are set from them. The modules' own Python then runs on any input as
the original does; ``verify.verify_tree`` checks the result on the example inputs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..core.fxutil import arg, is_get_attr, structural_copy
from ..core.optable import CONV_FUNCS, canonical

__all__ = ["transplant"]

# Module attributes that a graph call's argument holds: op -> (weight position, argument position, attribute),
# the attribute's name being the argument's keyword too.
_ARG_ATTRS: dict[Any, tuple[int, int, str]] = {
    **dict.fromkeys(CONV_FUNCS, (1, 6, "groups")),
    F.group_norm: (2, 1, "num_groups"),
    F.layer_norm: (2, 1, "normalized_shape"),
}


def _node_attrs(gm: torch.fx.GraphModule) -> dict[str, dict[str, Any]]:
    """Module name -> the attributes that the pruned graph's calls on the module's weight hold."""
    found: dict[str, dict[str, Any]] = {}
    for n in gm.graph.nodes:
        entry = _ARG_ATTRS.get(canonical(n.target)) if n.op == "call_function" else None
        if entry is None:
            continue
        at, pos, attr = entry
        weight, value = arg(n.args, n.kwargs, at, "weight"), arg(n.args, n.kwargs, pos, attr)
        if is_get_attr(weight) and value is not None:
            found.setdefault(weight.target.rpartition(".")[0], {})[attr] = tuple(value) if isinstance(value, list) else value
    return found


def _resize(mod: nn.Module, attrs: dict[str, Any]) -> None:
    """Set ``mod``'s size attributes from its (pruned) tensors and ``attrs`` from the graph."""
    for name, value in attrs.items():
        setattr(mod, name, value)
    w = getattr(mod, "weight", None)
    if isinstance(mod, nn.modules.conv._ConvNd):
        rows, cols = w.shape[0], w.shape[1] * mod.groups
        mod.in_channels, mod.out_channels = (rows, cols) if mod.transposed else (cols, rows)
    elif isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = w.shape
    elif isinstance(mod, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.PReLU)):
        per_channel = w if w is not None else getattr(mod, "running_mean", None)
        if per_channel is not None:
            field = {nn.GroupNorm: "num_channels", nn.PReLU: "num_parameters"}.get(type(mod), "num_features")
            setattr(mod, field, per_channel.shape[0])


def transplant(tree: nn.Module, pruned: torch.fx.GraphModule) -> nn.Module:
    """A copy of ``tree`` with ``pruned``'s tensors (by qualified name) and sizes to match; tensors the
    graph does not use are cloned, so the result owns all of its tensors."""
    new = structural_copy(tree)
    tensors = {**dict(pruned.named_parameters()), **dict(pruned.named_buffers())}
    attrs = _node_attrs(pruned)
    modules = list(new.named_modules())
    done: dict[int, torch.Tensor] = {}  # original tensor -> its replacement: tied tensors stay tied
    for prefix, mod in modules:
        for store in (mod._parameters, mod._buffers):
            for key, t in store.items():
                got = tensors.get(f"{prefix}.{key}" if prefix else key)
                if t is not None and got is not None:
                    done[id(t)] = got
    for prefix, mod in modules:
        for store in (mod._parameters, mod._buffers):
            for key, t in store.items():
                if t is not None and id(t) not in done:
                    done[id(t)] = nn.Parameter(t.detach().clone(), t.requires_grad) if isinstance(t, nn.Parameter) else t.clone()
                store[key] = None if t is None else done[id(t)]
        _resize(mod, attrs.get(prefix, {}))
    new.meta = {}
    return new
