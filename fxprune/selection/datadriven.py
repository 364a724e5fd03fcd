"""Data-driven selectors: ranked by statistics of calibration data or of the user's own fine-tuning
(``stats``: APoZ, mean activation, Taylor) or by the gradients of the norm layers' scales (``normgrad``:
bn_taylor)."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from ..core.graph import DependencyGraph
from ..errors import ArgumentError
from . import normgrad
from .protocol import Scores
from .stats import CALIBRATION_FORMS, LossFn, Tapped, activation_scores, tap
from .weights import BNScale, norm_weights

__all__ = ["BNTaylor", "ActivationSelector", "APoZ", "MeanActivation", "Taylor"]


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

    def scores(self, graph: DependencyGraph, gm: torch.fx.GraphModule) -> Scores:
        if self.calibration is None:
            raise ArgumentError("selector 'bn_taylor' needs calibration= and loss_fn= here (a pass over that data); "
                                "prune_iteratively(coarse=True) needs neither")
        per_atom = normgrad.atom_sums(graph, normgrad.pass_sums(gm, sorted(norm_weights(gm)), self.calibration, self.loss_fn))
        return {g.id: per_atom[g.atoms] for g in graph.prunable_groups}

    def untapped_scores(self, graph: DependencyGraph, gm: torch.fx.GraphModule) -> Scores:
        """Scores before any fine-tuning was tapped: the pass when there is data, else |gamma|."""
        return self.scores(graph, gm) if self.calibration is not None else BNScale().scores(graph, gm)

    def tap(self, graph: DependencyGraph, gm: torch.fx.GraphModule) -> normgrad.GradTap:
        return normgrad.GradTap(graph, gm, sorted(norm_weights(gm)))


class ActivationSelector:
    """Base of the data-driven selectors: scores atoms by a statistic of the activations on calibration
    data (see ``selection.stats``). Subclasses define ``values`` and ``finish`` (``ChannelStatistic``)."""

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

    def scores(self, graph: DependencyGraph, gm: torch.fx.GraphModule) -> Scores:
        per_atom = activation_scores(graph, gm, self.calibration, self, self.loss_fn)
        return {g.id: per_atom[g.atoms] for g in graph.prunable_groups}

    untapped_scores = scores

    def tap(self, graph: DependencyGraph, gm: torch.fx.GraphModule) -> Tapped:
        """``gm`` with taps that gather this statistic during the user's training forwards (``stats.tap``)."""
        return tap(graph, gm, self)


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
