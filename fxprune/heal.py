"""heal: fine-tuning a pruned model toward the original's outputs (distillation).

Matching the unpruned model's output distribution (KL divergence on the logits) needs no labels; on the
pruned decoder of docs/results.md (benchmarks/llm.py heals with it), 40 steps bring a 20% pruning to
within 2% of the dense model's bits per byte and a 50% one to within 7-8%. ``distillation`` returns the ``finetune`` that ``prune_iteratively`` takes,
and heals a one-shot ``compile`` result when called on it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ArgumentError
from .selection.stats import CALIBRATION_FORMS, calibration_batches

__all__ = ["distillation"]


def _logits(out: Any) -> torch.Tensor:
    """A model's logits: ``out.logits`` (Hugging Face), the first of a tuple, or the output itself."""
    if hasattr(out, "logits"):
        return out.logits
    return out if isinstance(out, torch.Tensor) else out[0]


def distillation(teacher: nn.Module, batches: Any, *, lr: float = 1e-3, temperature: float = 1.0) -> Callable[[nn.Module], nn.Module]:
    """A ``finetune(model)`` that trains ``model`` in place, one AdamW step at ``lr`` per batch of ``batches``
    (CALIBRATION_FORMS; targets are not read), toward ``teacher``'s outputs on the same inputs: the KL
    divergence of ``model``'s softmax from ``teacher``'s over the last dim of the logits, both divided by
    ``temperature``, averaged over every position. ``teacher`` (the unpruned model) is run in eval mode
    under no_grad and never changes; ``model`` is returned in the mode it came in."""
    if temperature <= 0 or lr <= 0:
        raise ArgumentError(f"distillation: lr and temperature must be positive, got lr={lr}, temperature={temperature}")

    def finetune(model: nn.Module) -> nn.Module:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        training, teaching = model.training, teacher.training
        model.train()
        teacher.eval()
        steps = 0
        try:
            for inputs, _ in calibration_batches(batches):
                with torch.no_grad():
                    target = F.log_softmax(_logits(teacher(*inputs)) / temperature, -1)
                log_p = F.log_softmax(_logits(model(*inputs)) / temperature, -1)
                loss = F.kl_div(log_p.flatten(0, -2), target.flatten(0, -2), log_target=True, reduction="batchmean")
                (loss * temperature**2).backward()
                opt.step()
                opt.zero_grad()
                steps += 1
        finally:
            model.train(training)
            teacher.train(teaching)
        if not steps:
            raise ArgumentError(f"distillation: batches yielded none; it must be {CALIBRATION_FORMS}")
        return model

    return finetune
