"""hfmodel: a pruned graph of a Hugging Face model -> a pruned model of the same class, whose config tells the truth.

The widths a config holds (``hidden_size``, ``intermediate_size``, ``num_attention_heads``,
``num_key_value_heads`` ...) are read from the pruned weights: each field is solved from the weight dims
that depend on it alone (found by building the class on the meta device with that field doubled), and
``head_dim`` is pinned, so that heads are counted, not resized. The model is then built from that config
and takes the pruned tensors by name, strictly: every shape matching is the proof that the config is
true, so ``generate()``, ``save_pretrained`` and ``from_pretrained`` work as for any model of the class.
One number per model cannot describe layers pruned to different widths (``equal_widths=False``), nor
attention narrower than the hidden size where the class derives ``head_dim`` from it (GPT-2, BERT): the
result is then the pruned GraphModule, and its report says why.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.fx
from torch import nn

__all__ = ["is_hf", "hf_model", "WIDTH_FIELDS"]

log = logging.getLogger("fxprune")

WIDTH_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "n_embd", "n_inner",
                "n_head", "d_model", "encoder_ffn_dim", "decoder_ffn_dim", "ffn_dim")
"""Config fields that hold widths a pruned model may change (one number per model)."""


def is_hf(model: Any) -> bool:
    """True for a ``transformers.PreTrainedModel`` (without importing transformers when it is not loaded)."""
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.") for c in type(model).__mro__)


def _shapes(cls: type, config: Any) -> dict[str, tuple[int, ...]] | None:
    """Parameter shapes of ``cls(config)``, built on the meta device; None if the class rejects the config."""
    try:
        with torch.device("meta"):
            model = cls(config)
    except Exception as exc:  # a config the class refuses: no such model
        log.debug("hfmodel: %s(%s) cannot be built: %s", cls.__name__, config.__class__.__name__, exc)
        return None
    return {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}


def _with(config: Any, **values: Any) -> Any:
    new = copy.deepcopy(config)
    for k, v in values.items():
        setattr(new, k, v)
    return new


def truthful_config(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> tuple[Any, str]:
    """A copy of ``model.config`` whose widths give exactly ``shapes`` (name -> pruned shape), or None with the reason."""
    cls, config = type(model), model.config
    head_dim, heads, hidden = (getattr(config, f, None) for f in ("head_dim", "num_attention_heads", "hidden_size"))
    if head_dim is None and isinstance(heads, int) and isinstance(hidden, int):
        head_dim = hidden // heads
    pinned = {"head_dim": head_dim} if isinstance(head_dim, int) else {}
    base_config = _with(config, **pinned)
    base = _shapes(cls, base_config)
    if base is None or set(base) != set(shapes):
        return None, f"{cls.__name__} built from its own config has other parameters than the pruned graph"
    stored = vars(config)  # not the aliases of ``attribute_map`` (GPT-2's hidden_size is its n_embd)
    fields = [f for f in WIDTH_FIELDS if isinstance(stored.get(f), int) and not isinstance(stored[f], bool)]
    probes = {f: _shapes(cls, _with(base_config, **{f: 2 * getattr(config, f)})) for f in fields}
    depends = {f: {(n, d) for n, shape in base.items() for d in range(len(shape)) if p is not None and p.get(n, shape)[d] != shape[d]}
               for f, p in probes.items()}
    values = dict(pinned)
    for f in fields:
        alone = depends[f] - set().union(*(depends[g] for g in fields if g != f))
        found = {shapes[n][d] * getattr(config, f) / base[n][d] for n, d in alone}
        if len(found) > 1:
            return None, (f"the pruned weights need more than one {f} ({', '.join(f'{v:g}' for v in sorted(found))}): layers pruned to "
                          f"different widths (compile with equal_widths=True), or a width that {cls.__name__} derives from another")
        if found:
            value = found.pop()
            if value != int(value):
                return None, f"the pruned widths are no whole {f}"
            values[f] = int(value)
    new = _with(config, **values)
    if _shapes(cls, new) != shapes:
        return None, (f"no {type(config).__name__} with one number per width field ({', '.join(fields) or 'none found'}) "
                      "describes the pruned weights")
    return new, ""


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


def hf_model(model: nn.Module, pruned: torch.fx.GraphModule) -> tuple[nn.Module | None, str]:
    """A model of ``model``'s class with ``pruned``'s tensors and a config that describes them, or None
    and the reason why no config can."""
    read = {n.target for n in pruned.graph.nodes if n.op == "get_attr" and n.users}  # a tied weight is read under one of its names
    held = {**dict(pruned.named_parameters(remove_duplicate=False)), **dict(pruned.named_buffers(remove_duplicate=False))}
    tensors = _by_every_name(model, {n: t for n, t in held.items() if n in read})
    ref = dict(model.named_parameters(remove_duplicate=False))
    shapes = {n: tuple(tensors[n].shape) if n in tensors else tuple(p.shape) for n, p in ref.items()}
    config, why = truthful_config(model, shapes)
    if config is None:
        return None, why
    from transformers.initialization import no_init_weights  # noqa: PLC0415 - a Hugging Face model: transformers is there

    with no_init_weights():  # every parameter is loaded below: random initialization would only cost time
        new = type(model)(config)
    new = new.to(device=next(model.parameters()).device, dtype=model.dtype)
    state = {**model.state_dict(), **tensors}
    new.load_state_dict({k: state[k].detach() for k in new.state_dict()}, strict=True)
    new.tie_weights()  # as the config says (tied input and output embeddings)
    if getattr(model, "generation_config", None) is not None:
        new.generation_config = copy.deepcopy(model.generation_config)
    new.train(model.training)
    return new, ""
