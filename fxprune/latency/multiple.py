"""The channel multiple that ``round_to="auto"`` stands for: measured under a latency target, fixed under a FLOPs one.

``fast_multiple`` is the measured rule behind ``round_to="auto"``. For each of the two costliest dense
layers and the costliest depthwise conv (by MACs; not dilated: a dilated conv runs another kernel, whose
time hardly steps with the width) it times every output width ``w`` in the window of 32 widths that ends
at a multiple of 32 near half the layer's width, with the input narrowed in proportion when it is pruned
too (as in a pruned model). The fastest way to keep at least ``w`` channels costs
``low(w) = min(t(v) for v >= w)``; a multiple ``r`` of 8 or 16 is as slow as ``t(w) / low(w)`` averaged
over its multiples in the window below the top (a multiple of both) and over the layers. The rule picks 8
unless its widths run more than 0.02 slower than 16's. Widths off the steps of the latency curve are what
makes a pruned model slower than its FLOPs promise, and a few percent per layer is a few percent of the
whole model. Finer multiples are no candidates: on whole models they ran slower than 8 wherever this was
measured, even where the timed layers' curves were flat (the few layers timed do not speak for the rest):
ResNet-50, ResNet-18 (1) and MobileNetV3-Large (4) 5-9%; five detectors that took 1 or 2, 0.54-0.66 of
the original's latency at half the FLOPs against 0.51-0.63 at 8 or 16 (docs/benchmarks.md). Grouped
convs, to whose per-group widths the width rule applies, save FLOPs but hardly any time below 8 channels
per group. A model with no layer wide enough to time gets 1 (8 with grouped convs).

``steady_multiple`` is the same rule without the clock, for FLOPs targets: 8 on every model wide enough
to time, so a FLOPs target gives the same plan on any machine and at any load.
"""

from __future__ import annotations

import torch.fx
from torch import nn

from ..core.groups import DependencyGraph
from .cache import TimingCache
from .costmodel import Layer, announce, measurable_layers, removable_atoms
from .timing import Setting

__all__ = ["fast_multiple", "steady_multiple", "MULTIPLES"]

MULTIPLES = (8, 16)
WINDOW = 32
TOLERANCE = 0.02
GROUPED = 8  # for a model with grouped convs and no layer wide enough to time (module docstring)


def _timed_layers(layers: dict[int, Layer], deps: DependencyGraph) -> list[int]:
    """The layers ``fast_multiple`` times: the two costliest dense ones and the costliest depthwise conv
    wide enough for its window, not dilated (module docstring)."""
    ranked = [i for i in sorted(layers, key=lambda i: -deps.flop_terms[i].macs)
              if layers[i].sizes[-1] >= 2 * WINDOW and not layers[i].dilated]
    dense = [i for i in ranked if layers[i].groups == 1]
    depthwise = [i for i in ranked if layers[i].multiplier == 1]
    return list({layers[i].key(layers[i].sizes): i for i in dense[:2] + depthwise[:1]}.values())


def _narrow_multiple(layers: dict[int, Layer]) -> int:
    """The multiple of a model with no layer wide enough to time: 1, or 8 with grouped convs."""
    return GROUPED if any(layer.grouped for layer in layers.values()) else 1


def steady_multiple(gm: torch.fx.GraphModule, deps: DependencyGraph, modules: dict[str, nn.Module] | None = None) -> int:
    """``round_to="auto"`` without the clock, for FLOPs targets: 8, the multiple ``fast_multiple`` picks
    unless 16's widths run faster, on every model wide enough to time; so the same model and target give
    the same plan on any machine, at any load. ``modules``: ``modules_of(gm)`` when the caller has it."""
    layers = measurable_layers(gm, deps, modules)
    return MULTIPLES[0] if _timed_layers(layers, deps) else _narrow_multiple(layers)


def _window(layer: Layer, pruned_in: bool) -> dict[int, tuple[int, ...]]:
    """Each output width ``fast_multiple`` times ``layer`` at, and the widths it keeps there: the window of
    ``WINDOW`` widths ending at the multiple of ``WINDOW`` nearest half its width, its input narrowed in
    proportion when pruned too (as a pruned model narrows a layer's inputs with its outputs)."""
    top = max(WINDOW, WINDOW * round(layer.sizes[-1] / 2 / WINDOW))
    c_in = layer.sizes[0]
    out = {}
    for w in range(top - WINDOW + 1, top + 1):
        if pruned_in:
            c_in = max(1, round(layer.sizes[0] * w / layer.sizes[-1]))
        out[w] = (w,) if layer.multiplier else (c_in, w)
    return out


def fast_multiple(gm: torch.fx.GraphModule, deps: DependencyGraph, setting: Setting, cache: TimingCache,
                  total_ms: float | None = None) -> int:
    """The channel multiple that ``round_to="auto"`` stands for on this model and device, for latency targets
    (module docstring); ``total_ms``, the model's milliseconds, sizes the estimate of how long the timings take.
    The decision is kept in ``cache`` under the setting and the layers it timed, even when a noisy machine holds
    the timings themselves: the stakes are a few percent (``TOLERANCE``), and a warm compile that decided again
    would spend seconds on it and could decide otherwise, and then not find the result its cold compile chose."""
    layers, removable = measurable_layers(gm, deps), removable_atoms(deps)
    chosen = _timed_layers(layers, deps)
    if not chosen:
        return _narrow_multiple(layers)
    decision = "round_to=auto " + " ".join(layers[i].key(layers[i].sizes) for i in chosen)
    if (kept := cache.lookup(setting, decision)) in MULTIPLES:
        return kept
    windows = {i: _window(layers[i], bool(removable[deps.flop_terms[i].factors[0]].any())) for i in chosen}
    announce(deps, layers, ((i, kept) for i in chosen for kept in windows[i].values()), total_ms, setting, cache,
             "for round_to='auto', which takes the multiple of 8 or 16 they run fastest at")
    slowdown = dict.fromkeys(MULTIPLES, 0.0)
    for i in chosen:
        ms = {w: layers[i].time(kept, setting, cache) for w, kept in windows[i].items()}
        top = max(ms)
        low = {w: min(ms[v] for v in ms if v >= w) for w in ms}
        for r in MULTIPLES:
            on = [ms[w] / low[w] for w in ms if w % r == 0 and w < top]  # the top is on every step
            slowdown[r] += sum(on) / len(on) / len(chosen)
    multiple = next(r for r in MULTIPLES if slowdown[r] <= min(slowdown.values()) + TOLERANCE)
    cache.put(setting, decision, multiple)  # kept (and saved) even when the timings are held: decided once per setting
    return multiple
