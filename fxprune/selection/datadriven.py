"""Data-driven selectors: ranked by statistics of calibration data or of the user's own fine-tuning
(``stats``: APoZ, mean activation, Taylor), by the input RMS of the layers that read each atom times
their weights (``stats``: wanda), by |weight x gradient| over the atom's parameters (weight_taylor) or by
the gradients of the norm layers' scales (``normgrad``: bn_taylor)."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from ..core.dataflow import read_params
from ..core.groups import DependencyGraph, Role
from ..errors import ArgumentError
from . import normgrad
from .protocol import Scores
from .stats import CALIBRATION_FORMS, LossFn, Tapped, activation_scores, channel_scores, tap
from .weights import BNScale, norm_weights

__all__ = ["BNTaylor", "Calibrated", "ActivationSelector", "APoZ", "MeanActivation", "Taylor", "Wanda", "WeightTaylor"]


class BNTaylor:
    """Taylor estimate on the normalization scales: ``|gamma * dL/dgamma|`` of the norm layers that scale
    each atom (``selection.normgrad``). ``compile`` takes it from one pass over ``calibration=`` with
    ``loss_fn=``; ``prune_iteratively(coarse=True)`` reads it from the gradients of the user's own
    fine-tuning and needs neither (its first step ranks by ``|gamma|``, as bn_scale). Atoms no norm layer
    scales score 0."""

    name = "bn_taylor"
    takes_loss = True
    takes_data = True

    def __init__(self, calibration: Any = None, loss_fn: LossFn | None = None) -> None:
        if (calibration is None) != (loss_fn is None):
            raise ArgumentError("selector 'bn_taylor' takes both calibration= and loss_fn= (a pass over that data), or "
                                "neither (prune_iteratively(coarse=True) reads the gradients of your fine-tuning)")
        self.calibration, self.loss_fn = calibration, loss_fn

    def scores(self, deps: DependencyGraph, gm: torch.fx.GraphModule) -> Scores:
        if self.calibration is None:
            raise ArgumentError("selector 'bn_taylor' needs calibration= and loss_fn= here (a pass over that data); "
                                "prune_iteratively(coarse=True) needs neither")
        per_atom = normgrad.atom_sums(deps, normgrad.pass_sums(gm, sorted(norm_weights(gm)), self.calibration, self.loss_fn))
        return {g.id: per_atom[g.atoms] for g in deps.prunable_groups}

    def untapped_scores(self, deps: DependencyGraph, gm: torch.fx.GraphModule) -> Scores:
        """Scores before any fine-tuning was tapped: the pass when there is data, else |gamma|."""
        return self.scores(deps, gm) if self.calibration is not None else BNScale().scores(deps, gm)

    def tap(self, deps: DependencyGraph, gm: torch.fx.GraphModule) -> normgrad.GradTap:
        return normgrad.GradTap(deps, gm, sorted(norm_weights(gm)))


class Calibrated:
    """Base of the selectors that read activations on ``calibration`` data (with ``loss_fn`` when
    ``needs_grad``): checks that they are given what they read, and nothing else."""

    name = ""
    needs_grad = False
    takes_data = True

    def __init__(self, calibration: Any = None, loss_fn: LossFn | None = None) -> None:
        if calibration is None:
            raise ArgumentError(f"selector {self.name!r} ranks channels by their activations: pass calibration= data, {CALIBRATION_FORMS}")
        if self.needs_grad and loss_fn is None:
            raise ArgumentError(f"selector {self.name!r} needs gradients: pass loss_fn=, called as loss_fn(output, target) on each calibration batch")
        if loss_fn is not None and not self.needs_grad:
            raise ArgumentError(f"loss_fn= is only used by selector 'taylor'; selector {self.name!r} does not take it")
        self.calibration, self.loss_fn = calibration, loss_fn


class ActivationSelector(Calibrated):
    """Base of the selectors that score atoms by a statistic of their own activations on calibration
    data (see ``selection.stats``). Subclasses define ``values`` and ``finish`` (``ChannelStatistic``)."""

    def scores(self, deps: DependencyGraph, gm: torch.fx.GraphModule) -> Scores:
        per_atom = activation_scores(deps, gm, self.calibration, self, self.loss_fn)
        return {g.id: per_atom[g.atoms] for g in deps.prunable_groups}

    untapped_scores = scores

    def tap(self, deps: DependencyGraph, gm: torch.fx.GraphModule) -> Tapped:
        """``gm`` with taps that gather this statistic during the user's training forwards (``stats.tap``)."""
        return tap(deps, gm, self)


class APoZ(ActivationSelector):
    """Average percentage of zeros: the share of a channel's activations that are <= 0 (a ReLU's zeros;
    for other nodes, what a ReLU would zero). Score ``1 - APoZ``: the channels that are zero most often go first."""

    name = "apoz"

    def values(self, activation: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
        return (activation <= 0).to(activation.dtype)

    def finish(self, mean: torch.Tensor) -> torch.Tensor:
        return 1 - mean


class MeanActivation(ActivationSelector):
    """Mean |activation| of each channel: the weakest channels go first."""

    name = "mean_activation"

    def values(self, activation: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
        return activation.abs()

    def finish(self, mean: torch.Tensor) -> torch.Tensor:
        return mean


class Taylor(ActivationSelector):
    """First-order Taylor estimate of the loss change when a channel is zeroed: ``|mean(a * dL/da)|`` over
    the batch and every position; the channels whose removal changes the loss least go first."""

    name = "taylor"
    needs_grad = True
    takes_loss = True

    def values(self, activation: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
        return activation * grad

    def finish(self, mean: torch.Tensor) -> torch.Tensor:
        return mean.abs()


class Wanda(Calibrated):
    """Activation-aware magnitude (Wanda-sp): an atom's score is the sum, over every weight that reads its
    channels (the linear and conv layers that consume them, ``DependencyGraph.consumers``), of ``|W|``
    over the weight's column for each channel times the RMS of that channel at the layer's input on the
    calibration data. A channel that is large but read by small weights, or read by large weights but
    nearly zero, goes first: what magnitude alone (l1/l2, the producer's weights) cannot see. Atoms that
    no weight reads (only attention's products do) score 0."""

    name = "wanda"

    def values(self, activation: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
        return activation.square()

    def finish(self, mean: torch.Tensor) -> torch.Tensor:
        return mean.sqrt()

    def scores(self, deps: DependencyGraph, gm: torch.fx.GraphModule) -> Scores:
        reads = weight_reads(deps, gm)
        rms = channel_scores(deps, gm, self.calibration, self, {src for src, _, _ in reads})
        params = dict(gm.named_parameters())
        total = torch.zeros(deps.num_atoms, dtype=torch.float64)
        for src, weight, dim in reads:
            if src in rms:
                ids = deps.tensor_atoms[src][1]
                per_channel = column_magnitudes(params[weight], dim, ids.numel()) * rms[src]
                kept = ids >= 0
                total.index_add_(0, ids[kept], per_channel[kept])
        return {g.id: total[g.atoms] for g in deps.prunable_groups}


class WeightTaylor(Calibrated):
    """First-order Taylor estimate on the weights (LLM-Pruner's element-wise importance): an atom's score is
    the sum of ``|w * dL/dw|`` over every parameter element its removal deletes (its rows of the layers that
    produce it, its columns of the layers that read it, its norm and bias entries), each the mean over the
    calibration batches of one pass with ``loss_fn``. Where ``taylor`` reads one node's activation, this
    reads every parameter of the atom."""

    name = "weight_taylor"
    needs_grad = True
    takes_loss = True

    def scores(self, deps: DependencyGraph, gm: torch.fx.GraphModule) -> Scores:
        params = dict(gm.named_parameters())
        names = sorted({name for name, _ in deps.member_atoms if name in params and params[name].requires_grad})
        sums = normgrad.pass_sums(gm, names, self.calibration, self.loss_fn)
        total = torch.zeros(deps.num_atoms, dtype=torch.float64)
        for (name, dim), atoms in deps.member_atoms.items():
            shape = params[name].shape if name in sums else None
            if shape is None or atoms.numel() != shape[dim]:  # a buffer, or a grouped conv's input dim (a group's channels)
                continue
            per_position = sums[name].view(shape).movedim(dim, 0).reshape(shape[dim], -1).sum(1)
            kept = atoms >= 0
            total.index_add_(0, atoms[kept], per_position[kept])
        return {g.id: total[g.atoms] for g in deps.prunable_groups}


def weight_reads(deps: DependencyGraph, gm: torch.fx.GraphModule) -> list[tuple[str, str, int]]:
    """(input node, weight, the weight's input dim) for each layer that reads channels through a weight
    parameter: the consumers whose input carries channels along the dim they contract."""
    nodes = {n.name: n for n in gm.graph.nodes}
    params = dict(gm.named_parameters())
    reads = []
    for name, pos, dim in deps.consumers:
        node = nodes[name]
        src = node.args[pos] if isinstance(pos, int) and pos < len(node.args) else None
        if not isinstance(src, torch.fx.Node) or deps.tensor_atoms.get(src.name, (None,))[0] != dim:
            continue
        reads += [(src.name, w, d) for w in _parameters_of(gm, node, params) for d in (0, 1)
                  if (w, d) in deps.members and deps.members[(w, d)].role == Role.IN]
    return reads


def _parameters_of(gm: torch.fx.GraphModule, node: torch.fx.Node, params: dict[str, torch.nn.Parameter]) -> list[str]:
    """Qualified names of the parameters ``node`` reads: its module's own, or the ones it reads directly."""
    if node.op == "call_module":
        return [f"{node.target}.{p}" for p in gm.get_submodule(node.target)._parameters]
    return read_params(node, params)


def column_magnitudes(weight: torch.Tensor, dim: int, channels: int) -> torch.Tensor:
    """Per input channel (``channels`` of them), the sum of ``|weight|`` over what reads it: its column
    along ``dim`` (the input dim), in each group of a grouped conv, whose weight holds one group's inputs."""
    w = weight.detach().to(torch.float64).abs().movedim(dim, 1)
    groups = channels // w.shape[1]
    per_group = w.reshape(groups, w.shape[0] // groups, w.shape[1], -1).sum((1, 3))
    return per_group.flatten()
