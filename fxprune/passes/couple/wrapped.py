"""Rules for functions that libraries keep as leaves of a traced graph (``torch.fx.wrap``).

torchvision's MViT adds relative positions to its attention logits in ``_add_rel_pos`` (heads pass
from the logits and the queries to the result; the position tables are shared by all heads).

torchvision's Swin calls its window attention, relative position bias and patch-merging padding as
such leaves; the capture pass swaps the attention for ``traceable.shifted_window_attention``, which
reads its widths from its weights. Its heads are atoms: a head's q, k and v rows of the packed
projection, its bias entries, its relative position bias and logit scale, and its columns of the
output projection. The head count argument follows the pruned relative position bias.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx

from ...core import metakeys as keys
from ...core.fxutil import arg
from ...core.groups import Family, Patch, PatchKind, Role
from ...core.traceable import shifted_window_attention
from .labels import Labels, Param
from .state import State, Unsupported, family, handles, owner


@handles(shifted_window_attention)
@family(Family.CONTRACT)
def window_attention(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Labels:
    """``traceable.shifted_window_attention(input, qkv_weight, proj_weight, relative_position_bias, ...)``."""
    src, x = s.input_of(node)
    qkv_w, proj_w = args[1], args[2]
    qkv_b, proj_b, scale = (arg(args, kwargs, i, name) for i, name in ((9, "qkv_bias"), (10, "proj_bias"), (11, "logit_scale")))
    params = [p for p in (qkv_w, proj_w, qkv_b, proj_b, scale) if p is not None]
    if not all(isinstance(p, Param) and p.name not in s.param_labels for p in params):
        raise Unsupported(f"window attention at node {node.name} computes its weights")
    bias = s.labels(args[3], node)
    heads = arg(args, kwargs, 5, "num_heads")
    rpb_node = node.args[3]
    if bias.dim != 1 or bias.shape[1] != heads or not isinstance(rpb_node, torch.fx.Node):
        raise Unsupported(f"window attention at node {node.name} has no per-head relative position bias")
    last = len(x.shape) - 1
    if x.dim not in (None, last):
        s.freeze(x, f"window attention at node {node.name} reads channels on the last dim only")
    c_in = qkv_w.tensor.shape[1]
    xin = x.ids if x.dim == last else x.ids[:1].expand(c_in)
    who = owner(node)
    head = bias.ids
    inner = qkv_w.tensor.shape[0] // 3
    cols = head.repeat_interleave(inner // heads)
    rows = cols.repeat(3)
    out_ids = s.uf.fresh(proj_w.tensor.shape[0])
    s.bind(qkv_w.name, 1, xin, who, Role.IN)
    s.bind(qkv_w.name, 0, rows, who, Role.OUT)
    s.bind(proj_w.name, 1, cols, who, Role.IN)
    s.bind(proj_w.name, 0, out_ids, who, Role.OUT)
    for p, ids, role in ((qkv_b, rows, Role.OUT), (proj_b, out_ids, Role.OUT), (scale, head, Role.PARAM)):
        if p is not None:
            s.bind(p.name, 0, ids, who, role)
    s.param_labels[proj_w.name] = Labels(tuple(proj_w.tensor.shape), 1, cols)  # the oracle masks these columns
    s.consumers.extend([(node.name, 0, last), (node.name, 2, 1)])
    s.patches.append(Patch(PatchKind.ARG, node.name, rpb_node.name, 1, path=("args", 5)))
    window = arg(args, kwargs, 4, "window_size")
    tokens = x.shape[0] * math.prod(math.ceil(size / w) * w for size, w in zip(x.shape[1:-1], window))
    qkv_macs, proj_macs = tokens * c_in * 3 * inner, tokens * inner * proj_w.tensor.shape[0]
    attention_macs = int(node.meta.get(keys.FLOPS, 0)) // 2 - qkv_macs - proj_macs
    s.flop_terms.extend([(node.name, qkv_macs, [xin, rows]), (node.name, attention_macs, [head]),
                         (node.name, proj_macs, [cols, out_ids])])
    return Labels(s.shape(node), last, out_ids)


@handles(by_name=("_get_relative_position_bias",))
@family(Family.SHAPE)
def relative_position_bias(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Labels:
    """torchvision's ``_get_relative_position_bias(table, index, window)``: (positions, heads) -> (1, heads, n, n)."""
    table = s.labels(args[0], node)
    if table.dim is not None and table.dim != len(table.shape) - 1:
        raise Unsupported(f"relative position bias at node {node.name} has channels off its heads dim")
    return Labels(s.shape(node), None if table.dim is None else 1, table.ids)


@handles(by_name=("_patch_merging_pad",))
@family(Family.SHAPE)
def patch_merging_pad(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Labels:
    """torchvision's ``_patch_merging_pad``: four strided slices of (..., H, W, C) joined on C."""
    src, x = s.input_of(node)
    last = len(x.shape) - 1
    if x.dim not in (None, last):
        raise Unsupported(f"patch merging at node {node.name} expects channels on the last dim")
    return Labels(s.shape(node), x.dim, x.ids if x.dim is None else x.ids.repeat(4))


@handles(by_name=("_add_rel_pos",))
@family(Family.CONTRACT)
def add_rel_pos(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Labels:
    """torchvision MViT's ``_add_rel_pos(attn, q, q_thw, k_thw, rel_pos_h, rel_pos_w, rel_pos_t)``.

    Heads (dim 1) pass from the logits and the queries to the result. The position tables are
    shared by all heads and contracted with the queries' head_dim (dim 3): channels of q there are
    bound to the tables' columns.
    """
    attn, q = s.labels(args[0], node), s.labels(args[1], node)
    tables = args[4:7]
    if attn.dim not in (None, 1) or q.dim not in (None, 1, 3):
        raise Unsupported(f"relative positions at node {node.name} read channels off the heads and head_dim dims")
    if q.dim == 3:
        if not all(isinstance(t, Param) and t.tensor.dim() == 2 for t in tables):
            raise Unsupported(f"relative positions at node {node.name} compute their tables")
        for t in tables:
            s.bind(t.name, 1, q.ids, owner(node), Role.IN)
        s.consumers.append((node.name, 1, 3))
        s.flops(node, [q.ids])
        return attn.with_shape(s.shape(node))
    if (attn.dim is None) != (q.dim is None):
        raise Unsupported(f"relative positions at node {node.name} mix per-head and shared tensors")
    s.uf.union_pairs(attn.ids, q.ids)
    return attn.with_shape(s.shape(node))
