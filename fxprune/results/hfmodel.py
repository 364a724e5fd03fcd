"""hfmodel: a pruned graph of a Hugging Face model -> a pruned model of the same class, whose config tells the truth.

The config's widths (one number per model, or one per stage) are solved from the pruned weights
(results/hfconfig.py), and selection keeps the widths that one config ties together in proportion, so
that one exists. The model is then built from that config and takes the pruned tensors by name, strictly:
every shape matching is the proof that the config is true, so ``generate()``, ``save_pretrained`` and
``from_pretrained`` work as for any model of the class. Layers pruned to different widths
(``equal_widths=False``) or a plan that prunes tied widths apart have no config: the result is then the
pruned GraphModule, and its report says why.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch import nn

from ..core import metakeys as keys
from .hfconfig import probe, truthful_config, with_biases

__all__ = ["hf_model", "of_class", "RTOL"]

RTOL = 1e-4
"""How closely a class rebuilt from the solved config must give the pruned graph's outputs (``verify_same``)."""


def _by_every_name(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` (the pruned graph's, by qualified name) also under every other name that ``model`` gives
    the same tensor: a graph holds tied weights (input and output embeddings) once."""
    names: dict[int, list[str]] = {}
    for n, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(t), []).append(n)
    out = dict(tensors)
    for aliases in names.values():
        found = next((tensors[n] for n in aliases if n in tensors), None)
        if found is not None:
            out.update(dict.fromkeys(aliases, found))
    return out


def hf_model(model: nn.Module, pruned: torch.fx.GraphModule) -> tuple[nn.Module | None, str, float]:
    """A model of ``model``'s class with ``pruned``'s tensors and a config that describes them, or None
    and the reason why no config can; and the relative tolerance within which its outputs must be the pruned
    graph's: 1e-4 (the same ops on the same weights), or 8 epsilons of its dtype where weights stored coarser than
    float32 were rescaled (``_follow_scales``: Gemma in bfloat16 differs by one rounding, 0.0078 in outputs of 1.15)."""
    read = {n.target for n in pruned.graph.nodes if n.op == "get_attr" and n.users}  # a tied weight is read under one of its names
    held = {**dict(pruned.named_parameters(remove_duplicate=False)), **dict(pruned.named_buffers(remove_duplicate=False))}
    tensors = _by_every_name(model, {n: t for n, t in held.items() if n in read})
    ref = dict(model.named_parameters(remove_duplicate=False))
    shapes = {n: tuple(tensors[n].shape) if n in tensors else tuple(p.shape) for n, p in ref.items()}
    p = probe(model)
    if p is None:
        return None, f"{type(model).__name__} built from its own config has other parameters than the model", RTOL
    config, why = truthful_config(p, shapes)
    compensated = pruned.meta.get(keys.RECORD, {}).get("compensated", [])
    gained = {w.rpartition(".")[0] + ".bias" for w in compensated} - set(ref)  # biases that compensation added
    if config is not None and gained:
        config, why = with_biases(type(model), config, gained)
    if config is None:
        return None, why, RTOL
    state = {**model.state_dict(), **tensors}

    def loaded(own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        zeros = {k: torch.zeros_like(v) for k, v in own.items() if k not in state and k.endswith(".bias")} if gained else {}
        return {k: (state[k] if k in state else zeros[k]).detach() for k in own}  # the other biases the flags turned on: zero

    new = of_class(model, config, loaded)
    coarse = model.dtype.is_floating_point and torch.finfo(model.dtype).bits < 32
    return new, "", 8 * torch.finfo(model.dtype).eps if _follow_scales(model, new) and coarse else RTOL


def _follow_scales(model: nn.Module, new: nn.Module) -> bool:
    """Where the class scales an embedding by a number it derives from the hidden size (``embed_scale``: Gemma's
    ``sqrt(hidden_size)`` in a buffer, BART's with ``scale_embedding`` as a number), the embedding's weight takes the
    ratio of the original's number to the new one, so that the class computes what the pruned graph does; when that
    weight is also the output head's, the module feeding the head divides its output by the ratio (``_divided``).
    Only saved weights change, so ``save_pretrained``/``from_pretrained`` keep it; what is left unmatched,
    ``verify_same`` finds. Whether any weight changed."""
    head = new.get_output_embeddings() if hasattr(new, "get_output_embeddings") else None
    originals = dict(model.named_modules())
    rescaled = False
    for name, m in new.named_modules():
        now, was = _scale(m), _scale(originals.get(name))
        if now is None or was is None or now == 0 or was == now:
            continue
        with torch.no_grad():
            m.weight.mul_(was / now)
        rescaled = True
        if head is not None and head.weight is m.weight and (feeding := _feeding(new, head)) is not None:
            _divided(feeding, was / now)
    return rescaled


def _scale(m: nn.Module | None) -> float | None:
    """The number an embedding module multiplies its output by (its ``embed_scale``), if it has one."""
    scale = getattr(m, "embed_scale", None) if isinstance(m, nn.Embedding) else None
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        return scale.item()
    return float(scale) if isinstance(scale, (int, float)) else None


def _feeding(model: nn.Module, head: nn.Module) -> nn.Module | None:
    """The last module with a weight before ``head`` among the base model's children: the final norm of a Hugging Face
    model (``norm``, ``ln_f``, ``final_layernorm``), whose output the head reads."""
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        return None
    last = [m for m in base.children() if isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.dim() == 1]
    return last[-1] if last else None


def _divided(norm: nn.Module, ratio: float) -> None:
    """Rescale ``norm``'s weight (and bias) so that its output is divided by ``ratio``: a weight read as ``w`` (LayerNorm,
    Llama's RMSNorm) or as ``1 + w`` (Gemma's), found by trying both on a probe input with a float32 copy of ``norm``;
    left as it was when neither does it."""
    probe = copy.deepcopy(norm).float()
    x = torch.randn(2, probe.weight.shape[0], generator=torch.Generator().manual_seed(0)).to(probe.weight.device)
    with torch.no_grad():
        want = probe(x) / ratio
        w0, b0 = probe.weight.clone(), None if getattr(probe, "bias", None) is None else probe.bias.clone()
        for offset in (0.0, 1.0):
            probe.weight.copy_((w0 + offset) / ratio - offset)
            if b0 is not None:
                probe.bias.copy_(b0 / ratio)
            if torch.allclose(probe(x), want, rtol=1e-4, atol=1e-5 * float(want.abs().max())):
                norm.weight.copy_(probe.weight)
                if b0 is not None:
                    norm.bias.copy_(probe.bias)
                return


def of_class(model: nn.Module, config: Any, state: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> nn.Module:
    """A new model of ``model``'s class built from ``config``, holding ``state(its own state dict)`` (loaded
    strictly), with ``model``'s device, dtype, generation config and training mode."""
    from transformers.initialization import no_init_weights  # noqa: PLC0415 - a Hugging Face model: transformers is there

    with no_init_weights():  # every parameter is loaded below: random initialization would only cost time
        new = type(model)(config)
    new = new.to(device=next(model.parameters()).device, dtype=model.dtype)
    new.load_state_dict(state(new.state_dict()), strict=True)
    new.tie_weights()  # as the config says (tied input and output embeddings)
    if getattr(model, "generation_config", None) is not None:
        new.generation_config = copy.deepcopy(model.generation_config)
    new.train(model.training)
    return new
