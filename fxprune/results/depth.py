"""depth: whole layers removed from a Hugging Face decoder, the ones that change its hidden states least.

A decoder layer adds its attention and MLP branches to the hidden states. Where its output is nearly
its input on calibration data (a mean cosine similarity near 1 over every token; 1 - cos is its
"influence", as ShortGPT scores layers), the model loses least without it; removing a layer also saves
its whole per-token cost, which width pruning of a small model at batch 1 barely touches. The class is
built anew from its config with fewer ``num_hidden_layers`` (per-layer lists such as ``layer_types``
follow) and takes the kept layers' weights renumbered, so ``generate()``, the KV cache, ``save_pretrained``
and ``from_pretrained`` work as for any model of the class.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..core.fxutil import is_hf
from ..errors import ArgumentError
from ..latency.timing import Comparison, compare
from ..selection.stats import CALIBRATION_FORMS, calibration_batches
from .hfmodel import of_class

__all__ = ["layer_influence", "without_layers", "layer_stack", "decode_comparison"]


def layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The qualified name and the ``nn.ModuleList`` of ``model``'s decoder layers: the one list with as many
    entries as its config's ``num_hidden_layers``."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == count]
    if not is_hf(model) or len(found) != 1:
        raise ArgumentError(f"drop_layers removes layers of a Hugging Face decoder whose config counts them (num_hidden_layers) "
                            f"in one list of modules; {type(model).__name__} has {len(found)} such lists")
    return found[0]


def _hidden(x: Any) -> torch.Tensor:
    """The hidden states among a layer's inputs or outputs (a tensor, or the first of a tuple)."""
    return x if isinstance(x, torch.Tensor) else x[0]


@torch.no_grad()
def layer_influence(model: nn.Module, calibration: Any) -> torch.Tensor:
    """For each decoder layer, 1 - the cosine similarity of its output hidden states to its input, averaged
    over every token of the ``calibration`` batches (float64): near 0, the layer changes little."""
    _, layers = layer_stack(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    tokens = torch.zeros(len(layers), dtype=torch.float64)

    def hook(i: int):
        def record(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            x = _hidden(args[0] if args else kwargs["hidden_states"])
            cos = torch.nn.functional.cosine_similarity(x.double(), _hidden(out).double(), dim=-1)
            sums[i] += (1 - cos).sum()
            tokens[i] += cos.numel()
        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    training = model.training
    model.eval()
    try:
        for inputs, _ in calibration_batches(calibration):
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(training)
    if not bool(tokens.all()):
        raise ArgumentError(f"calibration= ran no tokens through the decoder layers; it must be {CALIBRATION_FORMS}")
    return sums / tokens


def without_layers(model: nn.Module, drop: list[int]) -> nn.Module:
    """A new model of ``model``'s class without the decoder layers ``drop`` (indices): its config counts the
    rest, per-layer config lists keep their entries, and the kept layers' weights are renumbered."""
    path, layers = layer_stack(model)
    count = len(layers)
    kept = [i for i in range(count) if i not in set(drop)]
    if not kept or any(not 0 <= i < count for i in drop):
        raise ArgumentError(f"drop_layers: {type(model).__name__} has layers 0..{count - 1}; it must keep at least one (asked to drop {drop})")
    config = copy.deepcopy(model.config)
    for name, value in vars(config).items():  # per-layer lists (layer_types ...)
        if isinstance(value, list) and len(value) == count and name != "architectures":
            setattr(config, name, [value[i] for i in kept])
    config.num_hidden_layers = len(kept)
    renumber = {f"{path}.{old}.": f"{path}.{i}." for i, old in enumerate(kept)}
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith(f"{path}."):
            head = f"{path}.{key[len(path) + 1:].split('.', 1)[0]}."
            if head not in renumber:
                continue
            key = renumber[head] + key[len(head):]
        state[key] = value
    return of_class(model, config, lambda own: state)


class _Decoding(nn.Module):
    """``generate()`` of ``new_tokens`` greedy tokens after the prompt it is called on: what a decode
    speed target times."""

    def __init__(self, model: nn.Module, new_tokens: int) -> None:
        super().__init__()
        self.model, self.new_tokens = model, new_tokens

    def forward(self, prompt: torch.Tensor) -> torch.Tensor:
        return self.model.generate(prompt, max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens, do_sample=False)


def decode_comparison(model: nn.Module, small: nn.Module, prompt: torch.Tensor, new_tokens: int, goal: float) -> Comparison:
    """``small``'s ``generate()`` timed against ``model``'s in turns until the interval of their time ratio
    decides ``goal`` (``timing.compare``): its ``speedup`` is the ratio of decode tokens per second."""
    return compare(_Decoding(model, new_tokens), _Decoding(small, new_tokens), (prompt,), goal=goal)
