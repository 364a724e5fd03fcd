"""The latency cost model: milliseconds as a function of the channels removed.

It rests on timings of the model's own layers, rebuilt at other widths with random weights: every
conv (not transposed) and linear layer whose MACs the FLOP model tracks, called as a module or, in
torch.export and ops-run graphs, as a function on its weight. A layer's time at a width is
taken once per device, torch version, thread count and dtype and kept in the ``TimingCache``.

``LatencyModel`` answers the question ``select`` asks of a cost model, "what does the model cost with
these atoms removed?", in milliseconds: each measured layer's time is interpolated (multilinear) on a
grid of kept widths (a quarter, half and all of each pruned dimension, ``GRID``, rounded to the
width rule's multiple), and shrinks in proportion below the smallest; a contraction that cannot be
rebuilt (a matmul) costs its MACs at the measured layers' mean rate. Memory-bound
nodes (element-wise, normalization, pooling, reductions, concatenation) cost a measured time per element
they read and write (``Traffic``): their tensors shrink with their kept channels, and at batch 1 on a
CPU they are a large share of a thin model's time. What pruning does not change is the whole model's
measured time minus all of that (the fixed part).
"""

from __future__ import annotations

import logging
import math
import operator
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import TensorMetadata

from ..core import metakeys as keys
from ..core.flops import FlopModel
from ..core.fxutil import arg, is_get_attr, modules_of
from ..core.groups import NEVER_REMOVED, DependencyGraph, Family, FlopTerm
from ..core.optable import canonical
from ..core.widths import WidthRule
from .cache import TimingCache
from .timing import Latency, Setting, layer_ms

__all__ = ["Layer", "Traffic", "LatencyModel", "measurable_layers", "removable_atoms", "announce", "LOADED"]

log = logging.getLogger("fxprune")

LOADED = 1.5
"""Layers timed alone add up to 0.49-0.92 of the whole model's time on a quiet machine (SqueezeNet at batch 8 to ViT-B/16
at batch 1, 17 cases), 1.04 for MobileNetV2 at batch 8; timed while other work held the cores, 1.9-3.4
(two processes of 2-thread matmuls) and 7-8 (two spinning Python loops) for ResNet-18 and MobileNetV2 at batch 1. Past
this, a latency model's layers are timed again: loaded timings flatten its estimates (MobileNetV2's plan with 91% of
the FLOPs removed estimated at 1.6x)."""

GRID = (0.25, 0.5, 1.0)
"""Kept fractions each pruned dimension is timed at: a conv's or linear's time is close to bilinear in
its input and output widths, which multilinear interpolation reproduces exactly, so a 3x3 grid costs
half of a 4x4 one (3.1 against 6.3 full-layer timings) for the same estimates between the points."""


@dataclass(frozen=True)
class Layer:
    """A conv or linear module of the captured graph, as a recipe to rebuild it at other widths.

    ``sizes`` are the full sizes of the FlopTerm's factors: (input channels per group, output
    channels) for a conv or linear, (channels,) for a depthwise conv with ``multiplier`` outputs per input.
    """

    kind: str
    in_shape: tuple[int, ...]
    sizes: tuple[int, ...]
    groups: int
    multiplier: int
    options: tuple[tuple[str, Any], ...]

    @classmethod
    def of(cls, node: torch.fx.Node, spec: tuple[str, dict[str, Any]], term: FlopTerm) -> Layer | None:
        src = node.args[0] if node.args else None
        if not isinstance(src, torch.fx.Node) or keys.TENSOR_META not in src.meta:
            return None
        in_shape = tuple(src.meta[keys.TENSOR_META].shape)
        sizes = tuple(f.numel() for f in term.factors)
        kind, m = spec
        if kind == "Linear":
            return cls(kind, in_shape, sizes, 1, 0, (("bias", m["bias"]),)) if len(sizes) == 2 else None
        depthwise = m["groups"] > 1 and m["groups"] == m["in_channels"]
        if len(sizes) != (1 if depthwise else 2):
            return None
        options = tuple((k, m[k]) for k in ("kernel_size", "stride", "padding", "dilation", "bias", "padding_mode"))
        mult = m["out_channels"] // m["in_channels"] if depthwise else 0
        return cls(kind, in_shape, sizes, m["groups"], mult, options)

    @property
    def grouped(self) -> bool:
        """A grouped conv that is not depthwise."""
        return self.groups > 1 and not self.multiplier

    @property
    def dilated(self) -> bool:
        return any(d != 1 for d in dict(self.options).get("dilation", (1,)))

    def snap(self, kept: tuple[int, ...], multiple: int) -> tuple[int, ...]:
        """``kept`` rounded up to widths the layer can have: multiples of ``multiple`` (when narrower than
        the full size), of the depthwise multiplier; a grouped conv's per-group widths a multiple of
        ``multiple`` or all of them."""
        out = []
        for i, (k, n) in enumerate(zip(kept, self.sizes)):
            if self.grouped:  # the width rule's per-group widths
                unit = self.groups if i == 1 else 1
                step = unit * WidthRule(round_to=multiple).step(n // unit, repeated=True)
            else:
                step = self.multiplier or 1
                step = math.lcm(step, multiple) if n > multiple else step
            out.append(min(n, max(step, -(-k // step) * step)))
        return tuple(out)

    def key(self, kept: tuple[int, ...]) -> str:
        return f"{self.kind}{list(self.in_shape)} groups={self.groups} mult={self.multiplier} {dict(self.options)} kept={list(kept)}"

    def build(self, kept: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor]:
        """A fresh layer with the ``kept`` widths and a random input for it."""
        opts = dict(self.options)
        shape = list(self.in_shape)
        if self.kind == "Linear":
            shape[-1] = kept[0]
            layer: nn.Module = nn.Linear(kept[0], kept[1], bias=opts["bias"])
        else:
            conv = getattr(nn, self.kind)
            if self.multiplier:
                c_in, c_out, groups = kept[0] // self.multiplier, kept[0], kept[0] // self.multiplier
            else:
                c_in, c_out, groups = kept[0] * self.groups, kept[1], self.groups
            shape[1] = c_in
            layer = conv(c_in, c_out, groups=groups, **opts)
        return layer.to(device=device, dtype=dtype), torch.randn(shape, device=device, dtype=dtype)

    def time(self, kept: tuple[int, ...], setting: Setting, cache: TimingCache) -> float:
        def measure() -> Latency:
            layer, x = self.build(kept, torch.device(setting.device), getattr(torch, setting.dtype.removeprefix("torch.")))
            return layer_ms(layer, x)

        return cache.steady_ms(setting, self.key(kept), measure)


def _spec(node: torch.fx.Node, gm: torch.fx.GraphModule, modules: dict[str, nn.Module]) -> tuple[str, dict[str, Any]] | None:
    """(module class name, its attributes) of a conv (not transposed) or linear call: a module call, or a
    function call on a parameter (the torch.export and ops-run graphs' form)."""
    if node.op == "call_module":
        m = modules[node.target]
        if type(m) is nn.Linear:
            return "Linear", {"bias": m.bias is not None}
        if type(m) not in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
            return None
        names = ("groups", "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "padding_mode")
        return type(m).__name__, {**{k: getattr(m, k) for k in names}, "bias": m.bias is not None}
    t = canonical(node.target) if node.op == "call_function" else None
    args, kwargs = node.args, node.kwargs
    weight = arg(args, kwargs, 1, "weight")
    if t not in (F.linear, F.conv1d, F.conv2d, F.conv3d) or not is_get_attr(weight):
        return None
    w = operator.attrgetter(weight.target)(gm)
    bias = arg(args, kwargs, 2, "bias") is not None
    if t is F.linear:
        return "Linear", {"bias": bias}
    d = w.dim() - 2

    def per_dim(v: Any, default: int) -> Any:
        v = default if v is None else v
        return v if isinstance(v, str) else tuple(v) if isinstance(v, (list, tuple)) else (v,) * d

    groups = arg(args, kwargs, 6, "groups") or 1
    return f"Conv{d}d", {"groups": groups, "in_channels": w.shape[1] * groups, "out_channels": w.shape[0],
                         "kernel_size": tuple(w.shape[2:]), "stride": per_dim(arg(args, kwargs, 3, "stride"), 1),
                         "padding": per_dim(arg(args, kwargs, 4, "padding"), 0),
                         "dilation": per_dim(arg(args, kwargs, 5, "dilation"), 1), "padding_mode": "zeros", "bias": bias}


def measurable_layers(gm: torch.fx.GraphModule, deps: DependencyGraph, modules: dict[str, nn.Module] | None = None) -> dict[int, Layer]:
    """Index of each FlopTerm that ``Layer`` can rebuild, and its recipe; ``modules``: ``modules_of(gm)`` when the caller has it."""
    nodes = {n.name: n for n in gm.graph.nodes}
    modules = modules_of(gm) if modules is None else modules
    found = {}
    for i, term in enumerate(deps.flop_terms):
        node = nodes.get(term.node)
        spec = _spec(node, gm, modules) if node is not None else None
        layer = Layer.of(node, spec, term) if spec is not None else None
        if layer is not None:
            found[i] = layer
    return found


def removable_atoms(deps: DependencyGraph) -> torch.Tensor:
    """Whether some plan may remove each atom (those of prunable groups), indexable by a FlopTerm factor:
    its last entry, at ``NEVER_REMOVED``, is False."""
    out = torch.zeros(deps.num_atoms + 1, dtype=torch.bool)
    for g in deps.prunable_groups:
        out[g.atoms] = True
    return out


class Traffic:
    """Elements that the memory-bound nodes read and write, as a function of the removed-atom mask.

    A node counts when its op family is element-wise, channel-wise (pooling), normalization or
    reduction, or it is a concatenation; each tensor it reads or writes counts its elements, which shrink
    in proportion to the tensor's kept channels (``DependencyGraph.tensor_atoms``).
    """

    FAMILIES = (Family.ELEMENTWISE, Family.CHANNELWISE, Family.NORM, Family.REDUCTION)

    def __init__(self, gm: torch.fx.GraphModule, deps: DependencyGraph) -> None:
        uses: dict[str, int] = {}
        for n in gm.graph.nodes:
            if deps.families.get(n.name) in self.FAMILIES or (n.op == "call_function" and canonical(n.target) is torch.cat):
                for t in (n, *n.all_input_nodes):
                    if isinstance(t.meta.get(keys.TENSOR_META), TensorMetadata):
                        uses[t.name] = uses.get(t.name, 0) + 1
        self.constant = 0.0
        weights, sizes, rows, cols = [], [], [], []
        shapes = {n.name: n.meta[keys.TENSOR_META].shape for n in gm.graph.nodes if n.name in uses}
        for name, count in uses.items():
            elements = math.prod(shapes[name]) * count
            atoms = deps.tensor_atoms.get(name, (0, torch.empty(0, dtype=torch.long)))[1]
            atoms = atoms[atoms != NEVER_REMOVED]
            if atoms.numel() == 0:
                self.constant += elements
                continue
            rows.append(torch.full((atoms.numel(),), len(weights)))
            cols.append(atoms)
            weights.append(float(elements))
            sizes.append(float(deps.tensor_atoms[name][1].numel()))
        self.weights = torch.tensor(weights, dtype=torch.float64)
        self.sizes = torch.tensor(sizes, dtype=torch.float64)
        self.rows = torch.cat(rows) if rows else torch.empty(0, dtype=torch.long)
        self.cols = torch.cat(cols) if cols else torch.empty(0, dtype=torch.long)
        self.largest = max(shapes.values(), key=math.prod) if shapes else None

    def elements(self, removed: torch.Tensor) -> float:
        """Elements read and written after removing ``removed``."""
        kept = self.sizes.index_add(0, self.rows, removed[self.cols].to(torch.float64), alpha=-1)
        return float((self.weights * kept / self.sizes).sum()) + self.constant


def element_ms(shape: torch.Size, setting: Setting, cache: TimingCache) -> float:
    """Milliseconds per element read or written by a memory-bound op on this device: an eval-mode
    BatchNorm over a 4-d tensor of ``shape`` (one read and one write of each element)."""
    def measure() -> Latency:
        device, dtype = torch.device(setting.device), getattr(torch, setting.dtype.removeprefix("torch."))
        norm = nn.BatchNorm2d(shape[1]).eval().to(device=device, dtype=dtype)
        return layer_ms(norm, torch.randn(shape, device=device, dtype=dtype))

    return cache.steady_ms(setting, element_key(shape), measure) / (2 * math.prod(shape))


def element_key(shape: torch.Size) -> str:
    return f"BatchNorm2d{list(shape)}"


def _widths(grids: dict[int, tuple[list[list[int]], list[list[int]]]]) -> list[tuple[int, tuple[int, ...]]]:
    """Each (layer, kept widths) that ``grids`` (each layer's widths along each factor, and the grid's points) time."""
    return [(i, tuple(a[j] for a, j in zip(axes, index))) for i, (axes, points) in grids.items() for index in points]


def _interpolate(grid: list[list[int]], values: torch.Tensor, kept: list[float]) -> float:
    """Multilinear interpolation of ``values`` (one axis per factor, at the ``grid`` widths) at ``kept``;
    below the smallest grid width the value shrinks in proportion to the width."""
    v = values
    for points, k in zip(grid, kept):
        if k <= points[0] or len(points) == 1:
            v = v[0] * min(1.0, k / points[0])
            continue
        j = next((i for i in range(1, len(points)) if points[i] >= k), len(points) - 1)
        lo, hi = points[j - 1], points[j]
        w = min(1.0, (k - lo) / (hi - lo))
        v = v[j - 1] * (1 - w) + v[j] * w
    return float(v)


def announce(deps: DependencyGraph, layers: dict[int, Layer], wanted: Iterable[tuple[int, tuple[int, ...]]], total_ms: float | None,
             setting: Setting, cache: TimingCache, purpose: str) -> float:
    """Log how many of the ``wanted`` layer timings (layer, kept widths) the cache lacks, what for, and about how
    long they take (each about 12 calls of at least 1 ms; a layer at full width about its share of the model's
    MACs of ``total_ms``); the seconds. Layers of one shape share their timings (ResNet-50's 54 layers have 24
    shapes), so each is counted once."""
    missing: dict[str, tuple[int, tuple[int, ...]]] = {}  # timing key -> (the first layer that needs it, its widths)
    for i, kept in wanted:
        if (key := layers[i].key(kept)) not in missing and cache.lookup(setting, key) is None:
            missing[key] = i, kept
    if not missing:
        return 0.0
    macs = sum(deps.flop_terms[i].macs for i in layers) or 1
    ms = sum(12 * max(1.0, (total_ms or 0.0) * deps.flop_terms[i].macs / macs * math.prod(k / n for k, n in zip(kept, layers[i].sizes)))
             for i, kept in missing.values())
    shapes = len({i for i, _ in missing.values()})
    log.info("timing %d layer width%s of %d layer shape%s alone %s (about %.0f s; %s)", len(missing), "s" * (len(missing) > 1),
             shapes, "s" * (shapes > 1), purpose, max(1.0, ms / 1e3), f"not kept: {cache.not_kept}" if cache.not_kept else "kept for next time")
    return ms / 1e3


class LatencyModel:
    """Milliseconds of the model as a function of the removed-atom mask (see the module docstring)."""

    def __init__(self, deps: DependencyGraph, flops: FlopModel, gm: torch.fx.GraphModule, total_ms: float | None,
                 setting: Setting, cache: TimingCache, multiple: int, overdue: Callable[..., None] | None = None) -> None:
        """``total_ms``: the whole model's measured milliseconds, which fix the part pruning does not
        change; None leaves it out (the layers alone, enough to compare removals). ``overdue`` is called
        after each layer once the timings take more than twice their estimate and 5 s, and with why when the
        layers alone timed more than ``LOADED`` times ``total_ms`` (other work may have taken the cores: it may
        raise); those timings are then taken off the cache and the layers timed once more."""
        self.flops = flops
        self.setting = setting
        layers, removable = measurable_layers(gm, deps), removable_atoms(deps)
        grids = {}  # each layer's widths along each factor, and the grid's points
        for i, layer in layers.items():
            fixed = [not bool(removable[f].any()) for f in deps.flop_terms[i].factors]  # an image's channels, say
            axes = [[n] if fixed[d] else sorted({layer.snap((round(f * n),) * len(layer.sizes), multiple)[d] for f in GRID})
                    for d, n in enumerate(layer.sizes)]
            grids[i] = axes, torch.cartesian_prod(*[torch.arange(len(a)) for a in axes]).reshape(-1, len(axes)).tolist()
        self.traffic = Traffic(gm, deps)
        layer_ms, other, memory, per_element = self.timed(deps, layers, grids, total_ms, setting, cache, overdue)
        for again in (True, False):
            if overdue is None or total_ms is None or layer_ms + other + memory <= LOADED * total_ms:
                break
            why = (f"the layers alone timed {(layer_ms + other + memory) / total_ms:.3g} times as long as the whole model at the machine "
                   "check: other work took the cores while they were timed")
            cache.withdraw()
            cache.forget(setting, [layers[i].key(kept) for i, kept in _widths(grids)]  # read from the cache too: an earlier compile's
                         + ([element_key(self.traffic.largest)] if per_element else []))
            cache.save()
            if not again:  # the second time: the search's own timings correct the estimates as they go
                log.warning("%s, twice: the latency model's estimates may lean towards 1", why)
                break
            overdue(why)
            layer_ms, other, memory, per_element = self.timed(deps, layers, grids, total_ms, setting, cache, overdue)
        if total_ms is None:
            total_ms = layer_ms + other + memory
        self.total = total_ms
        self.scale = min(1.0, total_ms / (layer_ms + other + memory)) if layer_ms + other + memory > 0 else 1.0
        self.per_element = self.scale * per_element
        self.fixed = total_ms - self.scale * (layer_ms + other + memory)
        self.seen: dict[tuple[float, ...], float] = {}  # (term, kept widths) -> interpolated ms
        self.factors_of = [[] for _ in deps.flop_terms]
        for k, i in enumerate(flops.term_of.tolist()):
            self.factors_of[i].append(k)

    def timed(self, deps: DependencyGraph, layers: dict[int, Layer], grids: dict[int, tuple[list[list[int]], list[list[int]]]],
              total_ms: float | None, setting: Setting, cache: TimingCache, overdue: Callable[..., None] | None) -> tuple[float, ...]:
        """Time the ``layers`` at their ``grids``' widths (``self.grids``, ``self.rate``): the milliseconds of the layers at
        full width, of the contractions that cannot be rebuilt, of the memory-bound nodes, and per element of the latter."""
        allowed = 2 * announce(deps, layers, _widths(grids), total_ms, setting, cache, "for the latency model") + 5.0
        due = time.perf_counter() + allowed
        self.grids: dict[int, tuple[list[list[int]], torch.Tensor]] = {}
        for i, (axes, points) in grids.items():
            values = torch.zeros([len(a) for a in axes], dtype=torch.float64)
            for index in points:
                values[tuple(index)] = layers[i].time(tuple(a[j] for a, j in zip(axes, index)), setting, cache)
            self.grids[i] = (axes, values)
            if overdue is not None and time.perf_counter() > due:
                overdue()
                due = time.perf_counter() + allowed
        largest = self.traffic.largest
        per_element = element_ms(largest, setting, cache) if largest is not None and len(largest) == 4 else 0.0
        cache.save()
        terms = deps.flop_terms
        layer_ms = sum(float(v.flatten()[-1]) for _, v in self.grids.values())
        layer_macs = sum(terms[i].macs for i in self.grids)
        self.rate = layer_ms / layer_macs if layer_macs else 0.0  # ms per MAC, for terms that cannot be rebuilt
        other = sum(t.macs for i, t in enumerate(terms) if i not in self.grids) * self.rate
        return layer_ms, other, per_element * self.traffic.elements(torch.zeros(deps.num_atoms, dtype=torch.bool)), per_element

    def per_term(self, removed: torch.Tensor) -> list[float]:
        """Estimated milliseconds of each FlopTerm's node after removing ``removed``."""
        kept = self.flops.kept_per_factor(removed).tolist()
        sizes = self.flops.sizes.tolist()
        out = []
        for i, term in enumerate(self.flops.terms):
            ks = [kept[k] for k in self.factors_of[i]]
            if i in self.grids:
                key = (i, *ks)
                if key not in self.seen:
                    self.seen[key] = self.scale * _interpolate(*self.grids[i], ks)
                out.append(self.seen[key])
            else:
                out.append(self.scale * term.macs * self.rate * math.prod(k / sizes[f] for k, f in zip(ks, self.factors_of[i])))
        return out

    def cost(self, removed: torch.Tensor) -> float:
        """Estimated milliseconds after removing ``removed``."""
        return self.fixed + sum(self.per_term(removed)) + self.per_element * self.traffic.elements(removed)

    def layers(self, removed: torch.Tensor) -> dict[str, tuple[float, float]]:
        """Estimated milliseconds of each contracting node, before and after removing ``removed``."""
        before = self.per_term(torch.zeros_like(removed))
        return {t.node: (b, a) for t, b, a in zip(self.flops.terms, before, self.per_term(removed))}

    def describe(self, value: float) -> str:
        return f"{value:.4g} ms (estimated, {self.setting.device})"

    def reached(self, smallest: float) -> dict[str, float]:
        return {"best_speedup": self.total / smallest}
