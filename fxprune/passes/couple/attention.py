"""Rules for attention: heads are atoms.

A reshape that splits channels into (heads, head_dim) before an attention product keeps its labels
along the heads dim (``literals.reshape``), so a head's q, k and v channels form one atom. The
products then see labels on a batch dim: ``matmul`` ties them across its operands
(``contract.matmul``), and scaled dot-product attention ties q, k, v and a per-head mask here. Head
counts written as literals in reshapes follow the pruned width like any other literal size.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from ...core.fxutil import arg
from ...core.graph import Family
from .labels import Labels
from .state import State, Unsupported, family


@family(Family.CONTRACT)
def scaled_dot_product_attention(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Labels:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, ...)`` with channels along the heads dim.

    q, k and v must carry their labels on the same batch dim: those heads are tied and passed to the
    output. Labels on head_dim are not handled: the default scale (1 / sqrt(head_dim)) would change.
    """
    if arg(args, kwargs, 7, "enable_gqa", False):
        raise Unsupported(f"scaled_dot_product_attention at node {node.name} shares key/value heads (enable_gqa)")
    qkv = [s.labels(arg(args, kwargs, i, name), node) for i, name in enumerate(("query", "key", "value"))]
    mask = arg(args, kwargs, 3, "attn_mask")
    out_shape = s.shape(node)
    dims = {lab.dim - len(lab.shape) for lab in qkv if lab.dim is not None and lab.shape[lab.dim] > 1}
    if not dims:
        return Labels(out_shape, None, s.uf.fresh(1))
    d = dims.pop()
    if dims or d > -3 or any(lab.dim is None or lab.shape[lab.dim] == 1 for lab in qkv):
        s.freeze(qkv, f"scaled_dot_product_attention at node {node.name} reads channels other than whole heads "
                      "of query, key and value")
        return Labels(out_shape, None, s.uf.fresh(1))
    for lab in qkv[1:]:
        s.uf.union_pairs(qkv[0].ids, lab.ids)
    if mask is not None and not isinstance(mask, (bool, float)):
        m = s.labels(mask, node)
        if m.dim is not None and m.shape[m.dim] > 1:
            if m.dim - len(m.shape) == d:
                s.uf.union_pairs(qkv[0].ids, m.ids)
            else:
                s.freeze(m, f"the mask of scaled_dot_product_attention at node {node.name} varies along other than heads")
    s.flops(node, [qkv[0].ids])
    return Labels(out_shape, len(out_shape) + d, qkv[0].ids)
