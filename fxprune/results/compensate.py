"""compensate: the mean of each removed channel, folded into the bias of the linear layers that read it.

A linear layer's output gets ``W[:, c] * x_c`` from each input channel c. When pruning removes c, the
closest a constant can stand in for ``x_c`` is its mean over calibration data, not zero (FLAP's bias
compensation): the layer's bias gains ``W[:, removed] @ mean(x[removed])``, and a layer without a bias
gets one. This never moves the layer's output further from the original's on that data than removing
the channels alone (the mean is the least-squares constant) and costs one pass over the data.
The verified pruned graph is the reference the result is checked against before this step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..core import metakeys as keys
from ..core.fxutil import arg, is_get_attr
from ..core.groups import DependencyGraph, Role
from ..core.masks import Kept
from ..core.optable import canonical
from ..errors import ArgumentError
from ..selection.datadriven import weight_reads
from ..selection.stats import channel_scores

__all__ = ["compensate"]


class _Mean:
    """The per-channel mean (a ``stats.ChannelStatistic``)."""

    needs_grad = False

    def values(self, activation: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
        return activation

    def finish(self, mean: torch.Tensor) -> torch.Tensor:
        return mean


def _linear_weights(gm: torch.fx.GraphModule) -> set[str]:
    """Qualified names of the weights that linear layers (modules or calls) multiply their input by."""
    found = set()
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Linear):
            found.add(f"{n.target}.weight")
        elif n.op == "call_function" and canonical(n.target) is F.linear and is_get_attr(w := arg(n.args, n.kwargs, 1, "weight")):
            found.add(w.target)
    return found


def compensate(gm: torch.fx.GraphModule, deps: DependencyGraph, removed: torch.Tensor, pruned: torch.fx.GraphModule,
               calibration: Any) -> list[str]:
    """Fold the calibration mean of every channel ``removed`` from a linear layer's input into that layer's
    bias in ``pruned`` (``gm`` rewritten), in place; the names of the weights whose layers changed."""
    linear = _linear_weights(gm)
    reads = [(src, w) for src, w, dim in weight_reads(deps, gm) if dim == 1 and w in linear]
    kept = Kept(removed, {src: deps.tensor_atoms[src][1] for src, _ in reads})
    losing = [(src, w) for src, w in reads if kept.count[src] < kept.size[src] and _only_reader(deps, src, kept.mask(src), w)]
    means = channel_scores(deps, gm, calibration, _Mean(), {src for src, _ in losing})
    params = dict(gm.named_parameters())
    rows = pruned.meta[keys.RECORD]["kept"]["parameters"]
    for src, w in losing:
        gone = ~kept.mask(src)
        delta = params[w].detach().double()[:, gone] @ means[src][gone]
        if "0" in rows.get(w, {}):
            delta = delta[rows[w]["0"]]
        _add_to_bias(pruned, w, delta.to(params[w].dtype))
    if losing:
        pruned.recompile()
    return [w for _, w in losing]


def _only_reader(deps: DependencyGraph, src: str, kept: torch.Tensor, weight: str) -> bool:
    """Whether ``weight`` is the one layer that reads the channels removed from ``src``: channels inside a
    block (attention heads before the output projection, an MLP's hidden channels), as FLAP compensates.
    Channels that many layers read (a residual stream's) also change the norms in front of them, which a
    constant cannot stand in for: on a pruned decoder, compensating them made the logits worse."""
    atoms = deps.tensor_atoms[src][1][~kept]
    groups = set(deps.atom_group[atoms[atoms >= 0]].tolist())
    return all([(m.name, m.dim) for m in deps.groups[g].members if m.role == Role.IN] == [(weight, 1)] for g in groups)


def _add_to_bias(pruned: torch.fx.GraphModule, weight: str, delta: torch.Tensor) -> None:
    """Add ``delta`` to the bias of the linear layer of ``weight`` in ``pruned``, giving it one if it has none
    (a module's ``bias``; for a call, a parameter beside the weight, read by a new ``get_attr``)."""
    owner, _, _ = weight.rpartition(".")
    for n in pruned.graph.nodes:
        if n.op == "call_module" and n.target == owner:
            mod = pruned.get_submodule(owner)
            mod.bias = nn.Parameter(delta if mod.bias is None else mod.bias.detach() + delta, requires_grad=mod.weight.requires_grad)
            return
        if n.op == "call_function" and canonical(n.target) is F.linear and getattr(arg(n.args, n.kwargs, 1, "weight"), "target", None) == weight:
            bias = arg(n.args, n.kwargs, 2, "bias")
            if is_get_attr(bias):
                holder, _, field = bias.target.rpartition(".")
                mod = pruned.get_submodule(holder)
                setattr(mod, field, nn.Parameter(getattr(mod, field).detach() + delta))
                return
            if bias is not None:
                raise ArgumentError(f"compensate=True: node {n.name} is a linear layer whose bias is computed, not a parameter, "
                                    "so it cannot take the removed channels' mean; pass compensate=False")
            pruned.get_submodule(owner).register_parameter("bias", nn.Parameter(delta))
            with pruned.graph.inserting_before(n):
                n.args = (*n.args[:2], pruned.graph.get_attr(f"{owner}.bias"), *n.args[3:])
                n.kwargs = {k: v for k, v in n.kwargs.items() if k != "bias"}
            return
    raise ArgumentError(f"compensate=True: the pruned graph has no linear layer that reads {weight}; pass compensate=False")
