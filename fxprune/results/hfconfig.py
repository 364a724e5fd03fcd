"""hfconfig: which widths a Hugging Face config holds, which weight dims each one sizes, and the config of pruned weights.

A *slot* is one number of the config that sizes weights: a width field (``hidden_size``, ``n_inner``), or
one entry of a per-stage list (``hidden_sizes[1]``, ``num_heads[0]``, ``mlp_ratios[2]``). Which weight
dims a slot sizes is found by building the class on the meta device with that number doubled; fields the
config leaves unset (GPT-2's ``n_inner``) are first given the value the class uses for them. From that:

* ``config_ties``: the prunable groups whose widths one config can describe only together. Groups sized
  by a common slot are tied, and a tie keeps the same fraction of every group's atoms (so ratios such as
  ``mlp_ratio`` and the head size ``hidden_size / num_attention_heads`` hold); a group sized by no slot, or
  tied to a group that cannot prune (frozen, or one atom wide), keeps all its atoms.
* ``truthful_config``: the config whose widths give exactly the pruned shapes. Each slot is solved from
  the dims it alone sizes; a head count that sizes no weight (GPT-2, BERT, SegFormer derive the head size
  from the hidden size) follows from its hidden size at the original head size, and so does one that sizes
  weights only with other slots (StableLM's, with its key/value heads), those slots scaled with it.
"""

from __future__ import annotations

import copy
import itertools
import inspect
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.groups import DependencyGraph, Plan
from ..core.masks import kept_mask, removed_mask
from ..selection.budget import Tie

__all__ = ["WIDTH_FIELDS", "Probe", "probe", "config_ties", "truthful_config"]

log = logging.getLogger("fxprune")

WIDTH_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "n_embd", "n_inner", "n_head",
                "d_model", "encoder_ffn_dim", "decoder_ffn_dim", "ffn_dim", "encoder_attention_heads", "decoder_attention_heads",
                "hidden_sizes", "num_heads", "mlp_ratios", "mlp_ratio", "embed_dim", "decoder_hidden_size",
                "word_embed_proj_dim", "embedding_size", "dim", "hidden_dim", "n_heads", "pooler_hidden_size")
"""Config fields that hold widths a pruned model may change: one number per model, or one per stage (a list).
The embeddings' own width (OPT's ``word_embed_proj_dim``, ELECTRA's ``embedding_size``) follows the hidden size
it equals, or the class would add a projection between them; DistilBERT names its widths ``dim``, ``hidden_dim``; DeBERTa-v2's
pooler has ``pooler_hidden_size``."""

HEADS = {"num_attention_heads": ("hidden_size", "hidden_sizes"), "n_head": ("n_embd", "hidden_size"), "encoder_attention_heads": ("d_model",),
         "decoder_attention_heads": ("d_model",), "num_heads": ("hidden_size",), "n_heads": ("dim",)}
"""Head counts and the hidden sizes they divide into heads, where a class derives the head size from them."""

Slot = tuple[str, int | None]
Shapes = dict[str, tuple[int, ...]]
Dims = frozenset[tuple[str, int]]


@dataclass(frozen=True)
class Probe:
    """A class, its config with every slot set, the parameter shapes they give, and the dims each slot sizes."""

    cls: type
    config: Any
    shapes: Shapes
    sizes: dict[Slot, Dims]
    hidden_per_head: bool
    """The config's own validation asks ``hidden_size`` to be a multiple of ``num_attention_heads`` (Llama's
    ``validate_architecture``, although its head size is ``head_dim``)."""


def _shapes(cls: type, config: Any) -> Shapes | None:
    """Parameter shapes of ``cls(config)``, built on the meta device; None if the class rejects the config."""
    try:
        with torch.device("meta"):
            model = cls(config)
    except Exception as exc:  # a config the class refuses: no such model
        log.debug("hfconfig: %s(%s) cannot be built: %s", cls.__name__, type(config).__name__, exc)
        return None
    return {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _slots(config: Any) -> list[Slot]:
    """The config's width slots, as it stores them (not the aliases of ``attribute_map``: GPT-2's hidden_size is its n_embd)."""
    stored = vars(config)
    out: list[Slot] = []
    for f in WIDTH_FIELDS:
        v = stored.get(f)
        if _number(v):
            out.append((f, None))
        elif isinstance(v, (list, tuple)) and v and all(_number(x) for x in v):
            out.extend((f, i) for i in range(len(v)))
    return out


def value(config: Any, slot: Slot) -> Any:
    f, i = slot
    v = getattr(config, f)
    return v if i is None else v[i]


def with_values(config: Any, values: dict[Slot, Any]) -> Any:
    """A copy of ``config`` with the slots set to ``values`` (lists copied, keeping their type)."""
    new = copy.deepcopy(config)
    for (f, i), v in values.items():
        if i is None:
            setattr(new, f, v)
        else:
            items = list(getattr(new, f))
            items[i] = v
            setattr(new, f, type(getattr(config, f))(items))
    return new


def _changed(base: Shapes, other: Shapes | None) -> Dims:
    if other is None:
        return frozenset()
    return frozenset((n, d) for n, shape in base.items() for d in range(len(shape)) if n in other and other[n][d] != shape[d])


def _unset_widths(cls: type, config: Any, base: Shapes) -> dict[Slot, int]:
    """Width fields left None whose value the class chooses (GPT-2's ``n_inner``: 4 * n_embd), found by
    setting each to an odd marker and reading what the dims it sizes were."""
    marker, found = 7919, {}
    for f in WIDTH_FIELDS:
        if f in vars(config) and vars(config)[f] is None:
            dims = _changed(base, _shapes(cls, with_values(config, {(f, None): marker})))
            used = {base[n][d] for n, d in dims}
            if len(used) == 1:
                found[(f, None)] = used.pop()
    return found


def probe(model: nn.Module) -> Probe | None:
    """The slots of ``model``'s config and the dims each sizes; None when the class cannot be built from
    its own config as ``model`` is (other parameter names or shapes)."""
    cls, config = type(model), model.config
    config = copy.deepcopy(config)
    heads, hidden = (getattr(config, f, None) for f in ("num_attention_heads", "hidden_size"))
    if getattr(config, "head_dim", None) is None and isinstance(heads, int) and isinstance(hidden, int) and heads:
        config.head_dim = hidden // heads  # heads are counted, not resized (classes that derive it ignore it)
    base = _shapes(cls, config)
    if base is None or base != {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}:
        return None
    config = with_values(config, _unset_widths(cls, config, base))
    sizes = {s: _changed(base, _shapes(cls, with_values(config, {s: 2 * value(config, s)}))) for s in _slots(config)}
    return Probe(cls, config, base, sizes, _hidden_per_head(config))


def config_ties(p: Probe, deps: DependencyGraph) -> list[Tie]:
    """Prunable groups that one config describes only together (see the module docstring), in as many
    steps as every group's width and every head count a tied hidden size derives its head size from allow
    (one step, all atoms, where a group is sized by no slot or a slot also sizes a group that cannot prune)."""
    slots_of: dict[int, set[Slot]] = {}
    for g in deps.groups:
        dims = {(m.name, m.dim) for m in g.members}
        slots_of[g.id] = {s for s, sized in p.sizes.items() if sized & dims}
    fixed = {s for g in deps.groups if not g.prunable for s in slots_of[g.id]}
    parent = {g.id: g.id for g in deps.prunable_groups}

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[Slot, int] = {}
    for g in deps.prunable_groups:
        for s in slots_of[g.id]:
            if s in owner:
                parent[root(g.id)] = root(owner[s])
            else:
                owner[s] = g.id
    ties: dict[int, list[int]] = {}
    for g in deps.prunable_groups:
        ties.setdefault(root(g.id), []).append(g.id)
    heads = {hidden: value(p.config, s) for s, hidden in _derived_heads(p).items()}
    out = []
    for ids in ties.values():
        slots = set().union(*(slots_of[i] for i in ids))
        whole = any(not slots_of[i] for i in ids) or bool(slots & fixed)
        out.append(Tie(tuple(ids), 1 if whole else math.gcd(*(deps.groups[i].width for i in ids), *(heads[s] for s in slots & set(heads)))))
    return out


def _hidden_per_head(config: Any) -> bool:
    """Whether ``config``'s own validation refuses a ``hidden_size`` that is no multiple of ``num_attention_heads``."""
    heads, hidden = (vars(config).get(f) for f in ("num_attention_heads", "hidden_size"))
    if not (_number(heads) and _number(hidden)) or heads < 2:
        return False
    try:
        type(config).from_dict({**config.to_dict(), "hidden_size": hidden + 1 if (hidden + 1) % heads else hidden + 2})
    except Exception:  # noqa: BLE001 - the config's validation refuses a hidden size that is no multiple of the heads
        return True
    return False


def _derived_heads(p: Probe) -> dict[Slot, Slot]:
    """Head counts that size no weight (the class derives the head size from them), with their hidden size's slot."""
    out = {}
    for f, i in p.sizes:
        hidden = next(((h, i) for h in HEADS.get(f, ()) if (h, i) in p.sizes), None)
        if hidden is not None and not p.sizes[(f, i)]:
            out[(f, i)] = hidden
    return out


def _heads(p: Probe, values: dict[Slot, Any]) -> dict[Slot, Any] | str:
    """Head counts that size no weight, set from their solved hidden sizes at the original head size
    (or why they cannot be)."""
    out: dict[Slot, Any] = {}
    for s, hidden in _derived_heads(p).items():
        if hidden not in values:
            continue
        size = value(p.config, hidden) // value(p.config, s)
        if values[hidden] % size:
            return f"{_name(hidden)} {values[hidden]} is no whole number of heads of {size}"
        out[s] = values[hidden] // size
    return out


def _whole_heads(p: Probe, values: dict[Slot, Any]) -> dict[Slot, Any]:
    """Head counts that the pruned shapes do not fix, set from the solved hidden size at the original head size, and
    the slots that size the same weights scaled with them: StableLM derives its head size from hidden_size /
    num_attention_heads, so its head count and key/value head count size the key and value projections only together,
    and 4 heads of 8 give the shapes of 2 heads of 16. Pruning keeps heads whole, so the original head size is the
    graph's (single-head attention, which prunes within its head, keeps its count: no whole number of heads)."""
    out: dict[Slot, Any] = {}
    for (f, i), sized in p.sizes.items():
        hidden = next(((h, i) for h in HEADS.get(f, ()) if (h, i) in values), None)
        if hidden is None or (f, i) in values or not sized or value(p.config, (f, i)) < 2:
            continue
        count = value(p.config, (f, i))
        size = value(p.config, hidden) // count
        if values[hidden] % size or values[hidden] // size == count:
            continue
        scale = values[hidden] // size / count
        for t, dims in p.sizes.items():
            if t not in values and dims & sized and isinstance(value(p.config, t), int) and (value(p.config, t) * scale).is_integer():
                out[t] = int(value(p.config, t) * scale)
    return out


def _name(slot: Slot) -> str:
    return slot[0] if slot[1] is None else f"{slot[0]}[{slot[1]}]"


def _rebuilt(config: Any) -> Any:
    """``config`` built anew, so that widths its class derives in ``__init__`` (Swin's hidden_size from
    embed_dim) follow the solved ones."""
    params = inspect.signature(type(config).__init__).parameters
    derived = {f for f in WIDTH_FIELDS if f in vars(config) and f not in params}
    if not derived:
        return config
    return type(config).from_dict({k: v for k, v in config.to_dict().items() if k not in derived})


def truthful_config(p: Probe, shapes: Shapes) -> tuple[Any, str]:
    """A copy of the probed config whose widths give exactly ``shapes`` (name -> pruned shape), or None with the reason."""
    name = p.cls.__name__
    if set(p.shapes) != set(shapes):
        return None, f"{name} built from its own config has other parameters than the pruned graph"
    values: dict[Slot, Any] = {}
    for s, sized in p.sizes.items():
        alone = sized - set().union(*(d for t, d in p.sizes.items() if t != s))
        found = {shapes[n][d] * value(p.config, s) / p.shapes[n][d] for n, d in alone}
        if len(found) > 1:
            return None, (f"the pruned weights need more than one {_name(s)} ({', '.join(f'{v:g}' for v in sorted(found))}): layers pruned "
                          f"to different widths (equal_widths=False, or a plan given to apply_plan), where {name}'s config holds one")
        if found:
            v = found.pop()
            if isinstance(value(p.config, s), int):
                if v != int(v):
                    return None, f"the pruned widths are no whole {_name(s)}"
                v = int(v)
            values[s] = v
    heads = _heads(p, values)
    if isinstance(heads, str):
        return None, f"the pruned widths give {name} no head size it derives: {heads}"
    whole = _whole_heads(p, values)
    if whole and _shapes(p.cls, _rebuilt(with_values(p.config, {**values, **heads, **whole}))) == shapes:
        heads = {**heads, **whole}
    new = _rebuilt(with_values(p.config, {**values, **heads}))
    try:  # what from_pretrained will check
        type(new).from_dict(new.to_dict())
    except Exception as exc:  # noqa: BLE001 - any refusal of the config's own validation
        return None, f"{type(new).__name__} refuses the pruned widths ({str(exc).strip().splitlines()[-1].strip()})"
    built = _shapes(p.cls, new)
    if built != shapes:
        return None, f"no {type(p.config).__name__} describes the pruned weights: {_mismatch(name, built, shapes, {**values, **heads})}"
    return new, ""


def _mismatch(name: str, built: Shapes | None, shapes: Shapes, values: dict[Slot, Any]) -> str:
    """What ``name`` built from the solved ``values`` gives (``built``) that the pruned ``shapes`` are not: the first parameter that differs."""
    solved = ", ".join(f"{_name(s)}={v}" for s, v in values.items()) or "its own widths"
    if built is None:
        return f"{name} cannot be built with {solved}"
    for n, shape in shapes.items():
        if n not in built:
            return f"with {solved}, {name} has no {n}, which the pruned graph has"
        if built[n] != shape:
            return f"with {solved}, {name}'s {n} is {tuple(built[n])} where the pruned graph's is {tuple(shape)}"
    return f"with {solved}, {name} has {min(set(built) - set(shapes))}, which the pruned graph does not"


BIAS_FLAGS = ("attention_bias", "mlp_bias")
"""Config flags that give a class's projections biases (Llama-family configs: attention's q/k/v/o, the MLP's
gate/up/down), turned on for a result that gained biases (``compensate=True``)."""


def with_biases(cls: type, config: Any, names: set[str]) -> tuple[Any, str]:
    """``config`` with the fewest ``BIAS_FLAGS`` turned on whose class has a parameter of each of ``names``
    (biases a result gained), or None with the reason."""
    flags = [f for f in BIAS_FLAGS if getattr(config, f, None) is False]
    for k in range(1, len(flags) + 1):
        for chosen in itertools.combinations(flags, k):
            new = copy.deepcopy(config)
            for f in chosen:
                setattr(new, f, True)
            if names <= set(_shapes(cls, new) or ()):
                return new, ""
    return None, (f"{type(config).__name__} has no flag that gives {cls.__name__} the biases that compensate=True added "
                  f"({', '.join(sorted(names)[:3])}{', ...' if len(names) > 3 else ''})")


def valid_hidden(p: Probe, deps: DependencyGraph, plan: Plan, scores: dict[int, torch.Tensor], round_to: int) -> Plan:
    """``plan`` with its hidden size lowered, where needed, to a multiple of the head count it keeps (and of
    ``round_to``) when the config's validation asks for one (``Probe.hidden_per_head``): the lowest-scored kept
    channels of the groups the hidden size sizes go. Heads and hidden size are separate ties, so
    selection alone can keep 6 heads over a hidden size of 104."""
    heads_slot, hidden_slot = ("num_attention_heads", None), ("hidden_size", None)
    if not p.hidden_per_head or not p.sizes.get(heads_slot) or not p.sizes.get(hidden_slot):
        return plan
    removed = removed_mask(deps, plan)

    def kept(slot: Slot) -> int:
        name, dim = min(p.sizes[slot])
        if (name, dim) not in deps.member_atoms:
            return value(p.config, slot)
        return int(kept_mask(removed, deps.member_atoms[(name, dim)]).sum()) * value(p.config, slot) // p.shapes[name][dim]

    heads, hidden = kept(heads_slot), kept(hidden_slot)
    step = math.lcm(heads, round_to)
    if heads < 1 or hidden % heads == 0 or hidden < step:
        return plan
    drop = hidden - hidden // step * step
    keep = dict(plan.keep)
    for g in deps.prunable_groups:
        if {(m.name, m.dim) for m in g.members} & p.sizes[hidden_slot]:
            kept_atoms = torch.tensor(keep.get(g.id, range(g.width)), dtype=torch.long)
            order = torch.sort(scores[g.id][kept_atoms], stable=True).indices  # lowest score first
            keep[g.id] = sorted(kept_atoms[order[drop:]].tolist())
    return Plan(keep)
