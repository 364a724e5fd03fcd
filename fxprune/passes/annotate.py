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

from .. import metakeys as keys
from ..flops import FlopModel, total_macs
from ..graph import DependencyGraph, Family
from ..masks import kept_mask
from ..optable import IN_FIELDS, OUT_FIELDS, module_channels
from ..report import LayerRow, Report

__all__ = ["annotate"]

_OTHER_FAMILIES = (Family.ELEMENTWISE, Family.CHANNELWISE, Family.NORM, Family.REDUCTION)


def _numel(mod: nn.Module) -> int:
    return sum(p.numel() for p in mod.parameters())


def annotate(
    gm: torch.fx.GraphModule,
    pruned: torch.fx.GraphModule,
    graph: DependencyGraph,
    removed: torch.Tensor,
    flop_model: FlopModel,
) -> Report:
    after = flop_model.per_node(removed)
    capture_note = gm.meta.get(keys.CAPTURE)
    before_mods, after_mods = dict(gm.named_modules()), dict(pruned.named_modules())
    pruned_nodes = {n.name: n for n in pruned.graph.nodes}
    rows: list[LayerRow] = []
    other = [0, 0]
    for node in gm.graph.nodes:
        macs0 = int(node.meta.get(keys.FLOPS, 0)) // 2
        macs1 = after.get(node.name, macs0)
        if node.name in pruned_nodes:
            pruned_nodes[node.name].meta[keys.MACS] = macs1
        if graph.families.get(node.name) in _OTHER_FAMILIES and keys.TENSOR_META in node.meta:
            n0 = math.prod(node.meta[keys.TENSOR_META].shape)
            entry = graph.tensor_atoms.get(node.name)
            frac = float(kept_mask(removed, entry[1]).double().mean()) if entry is not None else 1.0
            other[0] += n0
            other[1] += round(n0 * frac)
        if node.op == "call_module":
            m0, m1 = before_mods[node.target], after_mods[node.target]
            p0, p1 = _numel(m0), _numel(m1)
            if not p0 and not macs0:
                continue
            rows.append(LayerRow(node.target, type(m0).__name__, (module_channels(m0, IN_FIELDS), module_channels(m1, IN_FIELDS)),
                                 (module_channels(m0, OUT_FIELDS), module_channels(m1, OUT_FIELDS)), (p0, p1), (macs0, macs1)))
        elif macs0:
            op = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
            rows.append(LayerRow(node.name, op, (None, None), (None, None), (0, 0), (macs0, macs1)))
    notes = []
    frozen = [g for g in graph.groups if g.frozen]
    if frozen:
        reasons = Counter(r for g in frozen for r in g.frozen[:1])
        top = "; ".join(f"{r} ({n} groups)" if n > 1 else r for r, n in reasons.most_common(5))
        notes.append(f"{len(frozen)} of {len(graph.groups)} groups frozen: {top}")
    if capture_note and capture_note != "torch.fx.symbolic_trace":
        notes.append(f"captured with {capture_note}")
    if graph.opaque:
        notes.append("kept opaque (could not be traced): " + ", ".join(graph.opaque))
    notes.extend(graph.notes.values())
    return Report(
        rows=rows,
        params=(_numel(gm), _numel(pruned)),
        macs=(total_macs(gm), flop_model.exact(removed)),
        other_flops=(other[0], other[1]),
        notes=notes,
    )
