"""Taylor importance of the normalization scales, ``|gamma * dL/dgamma|`` per channel, at almost no cost.

A norm layer's scale ``gamma`` multiplies one channel; zeroing the channel changes the loss by about
``gamma * dL/dgamma`` (first-order Taylor). The gradient is one small vector per norm layer that every
backward pass computes anyway, so the statistic needs no forward or backward pass of its own:

* ``pass_sums`` takes it from a pass over calibration data (one forward and backward per batch, eval
  mode, on a detached copy, ``torch.autograd.grad`` w.r.t. the scales only): what ``compile`` uses;
* ``GradTap`` reads it from the user's own fine-tuning: a ``register_post_accumulate_grad_hook`` on
  each scale adds ``|gamma * grad|`` after every backward, a few element-wise ops per norm layer. That is
  coarse ranking in ``prune_iteratively``, with no extra pass at all (the first step, which has no
  fine-tuning before it, ranks by ``|gamma|``).

Per channel the statistic is the mean over batches (or backward passes); an atom's score is the sum
over the scales bound to it (``DependencyGraph.member_atoms``); atoms without one score 0.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.fx

from ..errors import ArgumentError
from ..core.groups import DependencyGraph
from .stats import CALIBRATION_FORMS, LossFn, calibration_batches, detached_copy
from ..core.fxutil import eval_mode

__all__ = ["atom_sums", "pass_sums", "GradTap"]


def atom_sums(deps: DependencyGraph, per_weight: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per atom of ``deps`` (float64): the sum over the scales bound to it of their per-channel values."""
    total = torch.zeros(deps.num_atoms, dtype=torch.float64)
    for name, values in per_weight.items():
        atoms = deps.member_atoms.get((name, 0))
        if atoms is not None:
            total.index_add_(0, atoms, values.to(torch.float64))
    return total


def pass_sums(gm: torch.fx.GraphModule, weights: list[str], data: Any, loss_fn: LossFn) -> dict[str, torch.Tensor]:
    """Mean ``|gamma * dL/dgamma|`` per channel of each scale in ``weights`` over the batches of ``data``."""
    copy = detached_copy(gm, True)
    params = dict(copy.named_parameters())
    scales = [params[w] for w in weights]
    sums = {w: torch.zeros(params[w].numel(), dtype=torch.float64) for w in weights}
    batches = 0
    with eval_mode(copy), torch.enable_grad():
        for inputs, target in calibration_batches(data):
            loss = loss_fn(copy(*inputs), target)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
                raise ArgumentError("loss_fn(output, target) must return a scalar tensor computed from the model's output")
            grads = torch.autograd.grad(loss, scales, allow_unused=True)
            for w, p, g in zip(weights, scales, grads):
                if g is not None:
                    sums[w] += (p.detach() * g).abs().flatten().to(torch.float64)
            batches += 1
    if not batches:
        raise ArgumentError(f"calibration= yielded no batches; it must be {CALIBRATION_FORMS}")
    return {w: s / batches for w, s in sums.items()}


class GradTap:
    """``gm`` itself (``module``), with a hook on each scale in ``weights`` that adds ``|gamma * grad|``
    after every backward pass; ``atom_scores()`` reads the means and removes the hooks."""

    def __init__(self, deps: DependencyGraph, gm: torch.fx.GraphModule, weights: list[str]) -> None:
        self.deps, self.module, self.seconds = deps, gm, 0.0
        params = dict(gm.named_parameters())
        self.sums = {w: torch.zeros_like(params[w], memory_format=torch.contiguous_format).detach() for w in weights}
        self.counts = dict.fromkeys(weights, 0)
        self.handles = [params[w].register_post_accumulate_grad_hook(self._hook(w)) for w in weights]

    def _hook(self, name: str) -> Any:
        def add(p: torch.Tensor) -> None:
            start = time.perf_counter()
            self.sums[name].add_(torch.mul(p.detach(), p.grad).abs_())  # in place, on the parameter's device
            self.counts[name] += 1
            self.seconds += time.perf_counter() - start

        return add

    def atom_scores(self) -> torch.Tensor:
        for h in self.handles:
            h.remove()
        self.handles = []
        if not any(self.counts.values()):
            raise ArgumentError(
                "coarse ranking saw no backward pass: finetune(model) must train the model it is given "
                "(its loss.backward() feeds the ranking), or pass coarse=False with calibration= and loss_fn="
            )
        return atom_sums(self.deps, {w: s.flatten().to(torch.float64).cpu() / max(self.counts[w], 1) for w, s in self.sums.items()})
