"""Calibration statistics: per-atom activation statistics, gathered once for every data-driven selector.

The captured graph runs in eval mode, under a ``torch.fx.Interpreter`` that hands the output of every
probed node to a statistic, on a copy whose parameters are new leaf tensors sharing the user's storage
and whose buffers are clones: no gradient and no buffer update can reach the user's model. Probed nodes
are the call nodes whose output has a channel dim in ``DependencyGraph.tensor_atoms`` carrying atoms of
prunable groups. For each atom only the outputs of rectifier-like activations (``optable.is_activation``)
that carry it count, or every probed node that carries it when no activation does.

Per node, the statistic's per-element values are averaged per channel over the batch, every other
position and all calibration batches, then ``finish`` turns the means into per-channel scores; an atom's
score is the mean of the scores of the channels it owns (0 when no probed node carries it).
``channel_scores`` runs the same pass at nodes the caller names and returns their per-channel scores
(the wanda selector reads the inputs of the layers that consume each atom).

Coarse ranking gathers the same statistics without a pass of its own: ``tap`` returns the graph with an
identity module after every probed node, which feeds the accumulator during the user's training
forwards (grad enabled) and, for gradient statistics, from the backward pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator
from typing import Any, Protocol

import torch
import torch.fx
from torch import nn

from ..errors import ArgumentError, FxPruneError
from ..core.groups import DependencyGraph
from ..core.optable import is_activation
from ..core.fxutil import copy_graph, eval_mode, graph_module, structural_copy

__all__ = ["ChannelStatistic", "CALIBRATION_FORMS", "calibration_batches", "ClassSubset", "activation_scores", "channel_scores",
           "detached_copy",
           "Tapped", "tap"]

LossFn = Callable[[Any, Any], torch.Tensor]

CALIBRATION_FORMS = (
    "an iterable of batches (a DataLoader, a list...), each an input tensor, a 1-tuple (input,) or an "
    "(input, target) pair, where input is a tensor or a tuple of positional inputs; a single tensor is one batch"
)


class ChannelStatistic(Protocol):
    """What a data-driven selector measures. ``needs_grad``: ``values`` needs the loss gradient."""

    needs_grad: bool

    def values(self, activation: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
        """Per-element values (activation's shape), to be averaged per channel."""
        ...

    def finish(self, mean: torch.Tensor) -> torch.Tensor:
        """Per-channel means -> per-channel scores (higher = keep)."""
        ...


def calibration_batches(data: Any) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """Each batch of ``data`` as (positional inputs, target or None); the forms are CALIBRATION_FORMS."""
    if isinstance(data, torch.Tensor):
        data = [data]
    if not hasattr(data, "__iter__"):
        raise ArgumentError(f"calibration= is a {type(data).__name__}; expected {CALIBRATION_FORMS}")
    for i, batch in enumerate(data):
        if isinstance(batch, torch.Tensor):
            yield (batch,), None
        elif isinstance(batch, (tuple, list)) and len(batch) in (1, 2):
            inputs = batch[0]
            yield (tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)), (batch[1] if len(batch) == 2 else None)
        else:
            size = f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
            raise ArgumentError(f"calibration batch {i} is a {type(batch).__name__}{size}; expected {CALIBRATION_FORMS}")


class ClassSubset:
    """Calibration data restricted to the samples of ``classes`` (sorted), targets renumbered to
    0..len(classes)-1 to match a model that keeps only those outputs (``keep_classes=``)."""

    def __init__(self, data: Any, classes: list[int]) -> None:
        self.data, self.classes = data, torch.as_tensor(classes)

    def __iter__(self) -> Iterator[tuple[tuple[Any, ...], torch.Tensor]]:
        for i, (inputs, target) in enumerate(calibration_batches(self.data)):
            if not isinstance(target, torch.Tensor) or target.dim() != 1:
                raise ArgumentError(
                    f"calibration batch {i} has no class target; keep_classes= picks calibration samples by "
                    "class, so each batch must be an (input, target) pair with target of shape (batch,)"
                )
            chosen = torch.isin(target, self.classes)
            if bool(chosen.any()):
                yield tuple(x[chosen] for x in inputs), torch.searchsorted(self.classes, target[chosen])


def detached_copy(gm: torch.fx.GraphModule, requires_grad: bool) -> torch.fx.GraphModule:
    """A structural copy of ``gm`` with parameters detached (new leaves, same storage) and buffers cloned."""
    copy = structural_copy(gm)
    for m in copy.modules():
        for name, p in m._parameters.items():
            if p is not None:
                m._parameters[name] = nn.Parameter(p.detach(), requires_grad=requires_grad)
        for name, b in m._buffers.items():
            if b is not None:
                m._buffers[name] = b.detach().clone()
    return copy


def _probed(deps: DependencyGraph, gm: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    """Probed node -> mask over its channels: the ones whose statistics count (see the module docstring)."""
    prunable = torch.zeros(deps.num_atoms, dtype=torch.bool)
    for g in deps.prunable_groups:
        prunable[g.atoms] = True
    nodes = {n.name: n for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method")}
    modules = dict(gm.named_modules())
    carried = {}
    for name, (_, ids) in deps.tensor_atoms.items():
        mask = (ids >= 0) & prunable[ids.clamp(min=0)]
        if name in nodes and bool(mask.any()):
            carried[name] = mask
    activation = {name: is_activation(nodes[name], modules) for name in carried}
    has_activation = torch.zeros(deps.num_atoms, dtype=torch.bool)
    for name, mask in carried.items():
        if activation[name]:
            has_activation[deps.tensor_atoms[name][1][mask]] = True
    used = {}
    for name, mask in carried.items():
        if not activation[name]:
            mask = mask & ~has_activation[deps.tensor_atoms[name][1].clamp(min=0)]
        if bool(mask.any()):
            used[name] = mask
    return used


class _Accumulator:
    """Per-channel sums and per-channel element counts of a statistic's values, per probed node."""

    def __init__(self, statistic: ChannelStatistic, deps: DependencyGraph) -> None:
        self.statistic, self.deps = statistic, deps
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.seconds = 0.0  # time taps spent gathering (coarse ranking's whole cost)

    def add(self, name: str, activation: torch.Tensor, grad: torch.Tensor | None) -> None:
        dim, ids = self.deps.tensor_atoms[name]
        if activation.dim() <= dim or activation.shape[dim] != ids.numel():
            raise ArgumentError(
                f"node {name}: a calibration batch gives it shape {tuple(activation.shape)}, but it has {ids.numel()} "
                f"channels along dim {dim} on the example inputs; calibration inputs must have the example "
                "inputs' shape (the batch size may differ)"
            )
        v = self.statistic.values(activation.detach(), grad)
        others = [d for d in range(v.dim()) if d != dim]
        # one batch in the values' dtype, batches added in float64: 3x faster than a float64 reduction
        per_channel = (v.sum(others) if others else v).double().cpu()
        self.sums[name] = self.sums[name] + per_channel if name in self.sums else per_channel
        self.counts[name] = self.counts.get(name, 0) + v.numel() // ids.numel()

    def atom_scores(self, used: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean over each atom's used channels of ``finish(per-channel mean)``; 0 for unseen atoms."""
        total = torch.zeros(self.deps.num_atoms, dtype=torch.float64)
        count = torch.zeros(self.deps.num_atoms, dtype=torch.float64)
        for name, mask in used.items():
            if name in self.sums:
                ids = self.deps.tensor_atoms[name][1][mask]
                score = self.statistic.finish(self.sums[name] / self.counts[name])[mask]
                total.index_add_(0, ids, score)
                count.index_add_(0, ids, torch.ones_like(score))
        return total / count.clamp(min=1)


class _Probe(torch.fx.Interpreter):
    """Runs the graph; each probed node's floating-point output goes to the accumulator at once or,
    when the statistic needs gradients, is kept until the batch's loss is known."""

    def __init__(self, gm: torch.fx.GraphModule, probed: Collection[str], acc: _Accumulator) -> None:
        super().__init__(gm)
        self.probed, self.acc = probed, acc
        self.outputs: dict[str, torch.Tensor] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.probed and isinstance(out, torch.Tensor) and out.is_floating_point():
            if self.acc.statistic.needs_grad:
                self.outputs[n.name] = out
            else:
                self.acc.add(n.name, out, None)
        return out

    def batch(self, i: int, inputs: tuple[Any, ...], target: Any, loss_fn: LossFn | None) -> None:
        """Calibration batch ``i``: the forward and, for gradient statistics, d loss / d each probed output."""
        try:
            output = self.run(*inputs)
        except FxPruneError:
            raise
        except (RuntimeError, TypeError, AssertionError) as exc:  # AssertionError: a torch.export shape guard
            raise ArgumentError(
                f"calibration batch {i}: running the model on it failed ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                f"calibration= must be {CALIBRATION_FORMS}, shaped like the example inputs (a model captured "
                "by torch.export also keeps their batch size)"
            ) from exc
        if not self.acc.statistic.needs_grad:
            return
        outputs, self.outputs = self.outputs, {}
        loss = loss_fn(output, target)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
            raise ArgumentError("loss_fn(output, target) must return a scalar tensor computed from the model's output")
        names = [name for name, a in outputs.items() if a.requires_grad]
        grads = torch.autograd.grad(loss, [outputs[name] for name in names], allow_unused=True)
        for name, g in zip(names, grads):
            self.acc.add(name, outputs[name], torch.zeros_like(outputs[name]) if g is None else g)


def activation_scores(
    deps: DependencyGraph, gm: torch.fx.GraphModule, data: Any, statistic: ChannelStatistic, loss_fn: LossFn | None = None
) -> torch.Tensor:
    """Score of every atom of ``deps`` (float64) under ``statistic`` over the calibration ``data``.

    ``loss_fn(output, target)`` (target None for batches without one) is needed when the statistic
    uses gradients; they are taken with ``torch.autograd.grad`` w.r.t. the probed outputs only.
    """
    used = _probed(deps, gm)
    return _gather(deps, gm, data, statistic, used, loss_fn).atom_scores(used)


def channel_scores(
    deps: DependencyGraph, gm: torch.fx.GraphModule, data: Any, statistic: ChannelStatistic, nodes: Collection[str]
) -> dict[str, torch.Tensor]:
    """``finish`` of the per-channel means of ``statistic`` (float64) at each node of ``nodes`` whose output
    has a channel dim in ``deps.tensor_atoms`` and is floating point, over the calibration ``data``:
    for a selector that reads the inputs of given layers rather than the probed activations."""
    if statistic.needs_grad:
        raise FxPruneError("stats.channel_scores gathers forward statistics only; use activation_scores with loss_fn= for gradients")
    acc = _gather(deps, gm, data, statistic, {n for n in nodes if n in deps.tensor_atoms})
    return {name: statistic.finish(total / acc.counts[name]) for name, total in acc.sums.items()}


def _gather(deps: DependencyGraph, gm: torch.fx.GraphModule, data: Any, statistic: ChannelStatistic, nodes: Collection[str],
            loss_fn: LossFn | None = None) -> _Accumulator:
    """One pass over ``data`` on a detached copy of ``gm``, accumulating ``statistic`` at ``nodes``."""
    acc = _Accumulator(statistic, deps)
    copy = detached_copy(gm, statistic.needs_grad)
    probe = _Probe(copy, nodes, acc)
    batches = 0
    with eval_mode(copy), torch.set_grad_enabled(statistic.needs_grad):
        for i, (inputs, target) in enumerate(calibration_batches(data)):
            probe.batch(i, inputs, target, loss_fn)
            batches += 1
    if not batches:
        raise ArgumentError(f"calibration= yielded no batches; it must be {CALIBRATION_FORMS}")
    return acc


class _Tap(nn.Module):
    """Identity on one probed node's output; during training forwards it feeds the accumulator."""

    def __init__(self, name: str, acc: _Accumulator) -> None:
        super().__init__()
        self.node, self.acc = name, acc

    def forward(self, x: Any) -> Any:
        if torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.is_floating_point():
            start = time.perf_counter()
            if not self.acc.statistic.needs_grad:
                self.acc.add(self.node, x, None)
            elif x.requires_grad:
                seen = x.detach().clone()  # later in-place ops must not change what the gradient is paired with
                x.register_hook(lambda grad: self.backward_hook(seen, grad))
            self.acc.seconds += time.perf_counter() - start
        return x

    def backward_hook(self, seen: torch.Tensor, grad: torch.Tensor) -> None:
        start = time.perf_counter()
        self.acc.add(self.node, seen, grad)
        self.acc.seconds += time.perf_counter() - start


class Tapped:
    """A GraphModule with taps (``module``), the statistics they gathered (``atom_scores()``) and the
    seconds that took (``seconds``)."""

    def __init__(self, deps: DependencyGraph, gm: torch.fx.GraphModule, statistic: ChannelStatistic) -> None:
        self.used = _probed(deps, gm)
        self.acc = _Accumulator(statistic, deps)
        g, _, _ = copy_graph(gm.graph)
        taps: dict[str, nn.Module] = {}
        for node in list(g.nodes):
            if node.name in self.used:
                taps[f"fxprune_tap_{node.name}"] = _Tap(node.name, self.acc)
                with g.inserting_after(node):
                    t = g.call_module(f"fxprune_tap_{node.name}", (node,))
                node.replace_all_uses_with(t, delete_user_cb=lambda user: user is not t)
        self.module = graph_module(gm, g, taps)

    def atom_scores(self) -> torch.Tensor:
        if not self.acc.sums:
            raise ArgumentError(
                "coarse ranking saw no training forward pass: finetune(model) must run the model it is given "
                "with gradients enabled (or pass coarse=False to rank in a separate pass over calibration=)"
            )
        return self.acc.atom_scores(self.used)

    @property
    def seconds(self) -> float:
        return self.acc.seconds


def tap(deps: DependencyGraph, gm: torch.fx.GraphModule, statistic: ChannelStatistic) -> Tapped:
    """``gm`` with a tap after every probed node; its modules and tensors are ``gm``'s own (shared)."""
    return Tapped(deps, gm, statistic)
