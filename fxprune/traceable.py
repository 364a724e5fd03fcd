"""Traceable forms of library modules whose own forward hides channels from the coupling pass.

``nn.MultiheadAttention`` is a leaf of ``torch.fx`` tracing, and its forward packs q, k and v in one
weight and calls a fused kernel: traced as one opaque call, its heads and the residual width around it
could not be pruned. ``expand`` gives the capture pass the same computation as plain ops (one input
projection, a head split, ``scaled_dot_product_attention``, the output projection), which the coupling
pass understands and the rewrite can shrink; the literal head count in the split follows pruning.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import nn

__all__ = ["expand"]


def expand(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any] | None:
    """The traced result of ``m(*args, **kwargs)`` as plain ops, or None when ``m`` is kept as a leaf."""
    if isinstance(m, nn.MultiheadAttention):
        return _self_attention(m, args, kwargs)
    return None


_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal")


def _self_attention(m: nn.MultiheadAttention, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any] | None:
    """Self-attention without masks (query, key and value the same tensor), as ``m`` computes it."""
    call = {**dict(zip(_MHA_ARGS, args)), **kwargs}
    plain = (
        call["query"] is call.get("key") is call.get("value") and m._qkv_same_embed_dim and m.bias_k is None
        and not m.add_zero_attn and call.get("key_padding_mask") is None and call.get("attn_mask") is None
        and not call.get("is_causal", False)
    )
    if not plain:
        return None
    x = call["query"] if m.batch_first else call["query"].transpose(0, 1)
    b, n = x.shape[0], x.shape[1]
    qkv = F.linear(x, m.in_proj_weight, m.in_proj_bias).reshape(b, n, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    p = m.dropout if m.training else 0.0
    weights = None
    if call.get("need_weights", True):
        attn = F.dropout((q * m.head_dim ** -0.5 @ k.transpose(-2, -1)).softmax(-1), p)
        out = attn @ v
        weights = attn.mean(1) if call.get("average_attn_weights", True) else attn
    else:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
    out = m.out_proj(out.transpose(1, 2).reshape(b, n, m.num_heads * m.head_dim))
    return (out if m.batch_first else out.transpose(0, 1)), weights
