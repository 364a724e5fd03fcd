"""annotate: original + pruned GraphModule -> per-node MACs in ``node.meta`` and a Report.

MACs before come from the shapes pass (FlopCounterMode, per node); MACs after come from the exact
FlopModel, and are written to the pruned graph's ``node.meta["fxprune_macs"]``. Element-wise,
normalization, pooling and reduction ops are estimated separately at one FLOP per output element.
"""

from __future__ import annotations

import math
from collections import Counter

import torch
import torch.fx
from torch import nn

from ..core import metakeys as keys
from ..core.dataflow import channel_count, layers, read_params
from ..core.flops import FlopModel, total_macs
from ..core.fxutil import modules_of, tensors_of
from ..core.groups import DependencyGraph, Family
from ..core.masks import Kept
from ..core.optable import IN_FIELDS, OUT_FIELDS, module_channels
from ..report import LayerRow, Report

__all__ = ["annotate"]

_OTHER_FAMILIES = (Family.ELEMENTWISE, Family.CHANNELWISE, Family.NORM, Family.REDUCTION)


def _numel(module: nn.Module) -> int:
    """``sum(p.numel() for p in module.parameters())``, without ``parameters()``'s generator chain per
    module: the report asks for every layer of both models."""
    return sum(p.numel() for p in tensors_of(module).values())


def _kept(node: torch.fx.Node, deps: DependencyGraph, kept: Kept) -> tuple[int | None, int | None]:
    """(channels before, after) of ``node``'s output along its tracked channel dim (None when untracked),
    given the ``kept`` mask of every tracked tensor."""
    before = channel_count(node, deps)
    return before, kept.count.get(node.name, before)


def _function_channels(node: torch.fx.Node, deps: DependencyGraph, kept: Kept) -> list[tuple[int | None, int | None]]:
    """In and out channels of a function layer (a ``torch.export`` graph's conv, a functional linear),
    read off the tensors it takes and gives."""
    src = next((n for n in node.all_input_nodes if n.op != "get_attr"), None)
    return [_kept(src, deps, kept) if src is not None else (None, None), _kept(node, deps, kept)]


def annotate(
    gm: torch.fx.GraphModule,
    pruned: torch.fx.GraphModule,
    deps: DependencyGraph,
    removed: torch.Tensor,
    flop_model: FlopModel,
    modules: dict[str, nn.Module] | None = None,
) -> Report:
    """The report of ``pruned`` against ``gm``: each layer's channels, parameters and MACs before and after,
    the totals and the notes. ``modules``: ``modules_of(gm)`` when the caller has it."""
    after = flop_model.per_node(removed)
    capture_note = gm.meta.get(keys.CAPTURE)
    before_mods, after_mods = modules_of(gm) if modules is None else modules, modules_of(pruned)
    before_params, after_params = tensors_of(gm, modules=before_mods), tensors_of(pruned, modules=after_mods)
    named = layers(gm, before_mods)
    pruned_nodes = {n.name: n for n in pruned.graph.nodes}
    kept = deps.tensor_layout.kept(removed)
    rows: list[LayerRow] = []
    other = [0, 0]
    for node in gm.graph.nodes:
        macs0 = int(node.meta.get(keys.FLOPS, 0)) // 2
        macs1 = after.get(node.name, macs0)
        if node.name in pruned_nodes:
            pruned_nodes[node.name].meta[keys.MACS] = macs1
        shape = getattr(node.meta.get(keys.TENSOR_META), "shape", None)  # None for tuple outputs
        if deps.families.get(node.name) in _OTHER_FAMILIES and shape is not None:
            n0 = math.prod(shape)
            frac = kept.count[node.name] / kept.size[node.name] if kept.size.get(node.name) else 1.0
            other[0] += n0
            other[1] += round(n0 * frac)
        if node not in named:
            continue
        if node.op == "call_module":
            m0, m1 = before_mods[node.target], after_mods[node.target]
            rows.append(LayerRow(*named[node], (module_channels(m0, IN_FIELDS), module_channels(m1, IN_FIELDS)),
                                 (module_channels(m0, OUT_FIELDS), module_channels(m1, OUT_FIELDS)),
                                 (_numel(m0), _numel(m1)), (macs0, macs1)))
        else:
            p0 = sum(before_params[p].numel() for p in read_params(node, before_params))
            p1 = sum(after_params[p].numel() for p in read_params(pruned_nodes[node.name], after_params)) if node.name in pruned_nodes else p0
            rows.append(LayerRow(*named[node], *_function_channels(node, deps, kept), (p0, p1), (macs0, macs1)))
    notes = []
    frozen = [g for g in deps.groups if g.frozen and g.width > 1]  # one atom is kept whatever froze it
    if frozen:
        reasons = Counter(r for g in frozen for r in g.frozen[:1])
        top = "; ".join(f"{r} ({n} groups)" if n > 1 else r for r, n in reasons.most_common(5))
        notes.append(f"{len(frozen)} of {len(deps.groups)} groups frozen: {top}")
    if capture_note and capture_note != "torch.fx.symbolic_trace":
        notes.append(f"captured with {capture_note}")
    if deps.opaque:
        notes.append("kept opaque (could not be traced): " + ", ".join(deps.opaque))
    notes.extend(deps.notes.values())
    return Report(
        rows=rows,
        params=(sum(p.numel() for p in before_params.values()), sum(p.numel() for p in after_params.values())),
        macs=(total_macs(gm), flop_model.exact(after)),
        other_flops=(other[0], other[1]),
        notes=notes,
    )
