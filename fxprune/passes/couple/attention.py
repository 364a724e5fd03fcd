"""Rules for attention: heads are atoms; a single head's channels are its head_dim.

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

from ...core import metakeys as keys
from ...core.fxutil import arg
from ...core.groups import Family, Patch, PatchKind
from ...core.optable import SDPA
from .labels import Labels
from .state import State, family, handles


@handles(SDPA)
@family(Family.CONTRACT)
def scaled_dot_product_attention(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Labels:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, ...)``.

    Channels along the heads dim: q, k and v heads are tied and passed to the output; with
    ``enable_gqa`` a key/value head is tied to the query heads that read it. Channels along head_dim
    (a single head): q and k are contracted together and v's pass to the output; the default scale
    (1 / sqrt(head_dim)) becomes an explicit literal, so that pruning leaves it as it was.
    """
    qkv = [s.labels(arg(args, kwargs, i, name), node) for i, name in enumerate(("query", "key", "value"))]
    out_shape = s.shape(node)
    dims = {lab.dim - len(lab.shape) for lab in qkv if lab.dim is not None and lab.shape[lab.dim] > 1}
    if not dims:
        return Labels(out_shape, None, s.uf.fresh(1))
    d = dims.pop()
    if dims or any(lab.dim is None or lab.shape[lab.dim] == 1 for lab in qkv) or d not in (-1, -3):
        s.freeze(qkv, f"scaled_dot_product_attention at node {node.name} reads channels other than whole heads "
                      "of query, key and value, or than head_dim")
        return Labels(out_shape, None, s.uf.fresh(1))
    if d == -1:
        return within_head(s, node, args, kwargs, qkv)
    q, k, v = qkv
    if arg(args, kwargs, 7, "enable_gqa", False):  # key/value head j serves query heads j*r ... j*r + r-1
        k, v = (Labels(lab.shape, lab.dim, lab.ids.repeat_interleave(q.ids.numel() // lab.ids.numel())) for lab in (k, v))
    for lab in (k, v):
        s.uf.union_pairs(q.ids, lab.ids)
    mask = arg(args, kwargs, 3, "attn_mask")
    if mask is not None and not isinstance(mask, (bool, float)):
        m = s.labels(mask, node)
        if m.dim is not None and m.shape[m.dim] > 1:
            if m.dim - len(m.shape) == d:
                s.uf.union_pairs(q.ids, m.ids)
            else:
                s.freeze(m, f"the mask of scaled_dot_product_attention at node {node.name} varies along other than heads")
        elif len(m.shape) >= -d and m.shape[d] > 1:  # a heads dim of a size written as a literal (T5's zero bias)
            s.freeze(qkv, f"the mask of scaled_dot_product_attention at node {node.name} has as many heads as the "
                          "attention, but follows none of its channels")
    s.flops(node, [q.ids])
    return Labels(out_shape, len(out_shape) + d, q.ids)


def within_head(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any], qkv: list[Labels]) -> Labels:
    """Scaled dot-product attention with channels along head_dim: q and k are read channel by channel
    (consumers, tied), v's channels are the output's."""
    q, k, v = qkv
    s.uf.union_pairs(q.ids, k.ids)
    mask = arg(args, kwargs, 3, "attn_mask")
    if mask is not None and not isinstance(mask, (bool, float)):
        s.freeze(s.labels(mask, node), f"the mask of scaled_dot_product_attention at node {node.name} has channels")
    if arg(args, kwargs, 6, "scale") is None:
        path = ("args", 6) if len(node.args) > 6 else ("kwargs", "scale")
        s.patches.append(Patch(PatchKind.VALUE, node.name, node.name, -1, path=path, value=q.shape[-1] ** -0.5))
    last = len(q.shape) - 1
    s.consumers.extend([(node.name, 0, last), (node.name, 1, last)])
    macs = int(node.meta.get(keys.FLOPS, 0)) // 2
    scores = macs * q.shape[-1] // (q.shape[-1] + v.shape[-1])  # q k^T, then the weights times v
    s.flop_terms.extend([(node.name, scores, [q.ids]), (node.name, macs - scores, [v.ids])])
    out_shape = s.shape(node)
    return Labels(out_shape, len(out_shape) - 1, v.ids)
