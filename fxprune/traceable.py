"""Traceable forms of library modules whose own forward hides channels from the coupling pass.

``nn.MultiheadAttention`` is a leaf of ``torch.fx`` tracing, and its forward packs q, k and v in one
weight and calls a fused kernel: traced as one opaque call, its heads and the residual width around it
could not be pruned. ``expand`` gives the capture pass the same computation as plain ops (one input
projection, a head split, ``scaled_dot_product_attention``, the output projection), which the coupling
pass understands and the rewrite can shrink; the literal head count in the split follows pruning.

Library functions kept as leaves of the traced graph (``torch.fx.wrap``) that take their widths from
their input are replaced by versions that take them from their weights (``library_functions``):
the coupling pass gives those a rule of their own.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["expand", "shifted_window_attention", "library_functions"]


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


def shifted_window_attention(
    input: torch.Tensor,
    qkv_weight: torch.Tensor,
    proj_weight: torch.Tensor,
    relative_position_bias: torch.Tensor,
    window_size: list[int],
    num_heads: int,
    shift_size: list[int],
    attention_dropout: float = 0.0,
    dropout: float = 0.0,
    qkv_bias: torch.Tensor | None = None,
    proj_bias: torch.Tensor | None = None,
    logit_scale: torch.Tensor | None = None,
    training: bool = True,
) -> torch.Tensor:
    """Swin's (shifted) window attention on ``input`` (B, H, W, C), as torchvision computes it, with
    the attention width and the output width read from the weights: torchvision's own function reads
    both from C, which stops being true once heads or the residual width are pruned."""
    b, h, w, _ = input.shape
    wh, ww = window_size
    x = F.pad(input, (0, 0, 0, -w % ww, 0, -h % wh))
    ph, pw = x.shape[1], x.shape[2]
    sh, sw = (shift_size[0] if wh < ph else 0), (shift_size[1] if ww < pw else 0)
    if sh or sw:
        x = torch.roll(x, (-sh, -sw), (1, 2))
    nh, nw, n = ph // wh, pw // ww, wh * ww
    windows = x.view(b, nh, wh, nw, ww, -1).permute(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, n, -1)
    inner = qkv_weight.shape[0] // 3
    if logit_scale is not None and qkv_bias is not None:  # Swin V2 has no key bias
        qkv_bias = torch.cat([qkv_bias[:inner], torch.zeros_like(qkv_bias[inner:2 * inner]), qkv_bias[2 * inner:]])
    qkv = F.linear(windows, qkv_weight, qkv_bias).reshape(-1, n, 3, num_heads, inner // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:  # Swin V2: cosine attention
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * (inner // num_heads) ** -0.5) @ k.transpose(-2, -1)
    attn = attn + relative_position_bias
    if sh or sw:
        mask = _shift_mask(ph, pw, wh, ww, sh, sw).to(attn)
        attn = (attn.view(b, nh * nw, num_heads, n, n) + mask[None, :, None]).view(-1, num_heads, n, n)
    attn = F.dropout(attn.softmax(-1), attention_dropout, training)
    out = (attn @ v).transpose(1, 2).reshape(-1, n, inner)
    out = F.dropout(F.linear(out, proj_weight, proj_bias), dropout, training)
    c = out.shape[-1]
    out = out.view(b, nh, nw, wh, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, c)
    if sh or sw:
        out = torch.roll(out, (sh, sw), (1, 2))
    return out[:, :h, :w, :].contiguous()


def _shift_mask(ph: int, pw: int, wh: int, ww: int, sh: int, sw: int) -> torch.Tensor:
    """(windows, n, n): -100 between two positions of one window that the cyclic shift brought
    together from different regions of the feature map, 0 elsewhere."""

    def bands(size: int, win: int, shift: int) -> list[tuple[int, int]]:
        return [(0, size - win), (size - win, size - shift), (size - shift, size)] if shift else [(0, size)]

    region = torch.zeros(ph, pw)
    for i, (h0, h1) in enumerate(bands(ph, wh, sh)):
        for j, (w0, w1) in enumerate(bands(pw, ww, sw)):
            region[h0:h1, w0:w1] = 3 * i + j
    ids = region.view(ph // wh, wh, pw // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
    return torch.where(ids[:, None, :] != ids[:, :, None], -100.0, 0.0)


def library_functions() -> dict[Any, Any]:
    """Leaf functions of library models (``torch.fx.wrap``) -> the replacement the captured graph calls."""
    from torchvision.models import swin_transformer

    return {swin_transformer.shifted_window_attention: shifted_window_attention}
