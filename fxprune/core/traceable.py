"""Traceable forms of library modules whose own forward hides channels from the coupling pass.

``nn.MultiheadAttention`` is a leaf of ``torch.fx`` tracing, and its forward packs q, k and v in one
weight and calls a fused kernel: traced as one opaque call, its heads and the residual width around it
could not be pruned. ``expand`` gives the capture pass the same computation as plain ops (one input
projection, a head split, ``scaled_dot_product_attention``, the output projection), which the coupling
pass understands and the rewrite can shrink; the literal head count in the split follows pruning.

Library functions kept as leaves of the traced graph (``torch.fx.wrap``) that take their widths from
their input are replaced by versions that take them from their weights (``library_functions``):
the coupling pass gives those a rule of their own. Library functions that trace to many nodes where a
few torch ops do the same are kept as leaves by the capture's tracer and then replaced by those ops
(``inlined_functions``): the result's code calls torch alone.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["expand", "shifted_window_attention", "window_and_shift_size", "channel_shuffle", "library_functions", "inlined_functions"]


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
    """Swin's (shifted) window attention on ``input`` (B, *spatial, C), 2-d or 3-d, as torchvision
    computes it, with the attention width and the output width read from the weights: torchvision's
    own functions read both from C, which stops being true once heads or the residual width are pruned."""
    b, *size, _ = input.shape
    k = len(size)
    pads = [p for i in reversed(range(k)) for p in (0, -size[i] % window_size[i])]
    x = F.pad(input, [0, 0, *pads])
    padded = list(x.shape[1:-1])
    shift = [s if w < p else 0 for s, w, p in zip(shift_size, window_size, padded)]
    dims = tuple(range(1, k + 1))
    if any(shift):
        x = torch.roll(x, [-s for s in shift], dims)
    counts = [p // w for p, w in zip(padded, window_size)]
    n = math.prod(window_size)
    windows = _to_windows(x, counts, window_size)
    inner = qkv_weight.shape[0] // 3
    if logit_scale is not None and qkv_bias is not None:  # Swin V2 has no key bias
        qkv_bias = torch.cat([qkv_bias[:inner], torch.zeros_like(qkv_bias[inner:2 * inner]), qkv_bias[2 * inner:]])
    qkv = F.linear(windows, qkv_weight, qkv_bias).reshape(-1, n, 3, num_heads, inner // num_heads).permute(2, 0, 3, 1, 4)
    q, key, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:  # Swin V2: cosine attention
        attn = F.normalize(q, dim=-1) @ F.normalize(key, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * (inner // num_heads) ** -0.5) @ key.transpose(-2, -1)
    attn = attn + relative_position_bias
    if any(shift):
        mask = _shift_mask(padded, window_size, shift).to(attn)
        attn = (attn.view(b, -1, num_heads, n, n) + mask[None, :, None]).view(-1, num_heads, n, n)
    attn = F.dropout(attn.softmax(-1), attention_dropout, training)
    out = (attn @ v).transpose(1, 2).reshape(-1, n, inner)
    out = F.dropout(F.linear(out, proj_weight, proj_bias), dropout, training)
    out = _from_windows(out, b, counts, window_size)
    if any(shift):
        out = torch.roll(out, shift, dims)
    return out[(slice(None), *(slice(0, s) for s in size))].contiguous()


def _to_windows(x: torch.Tensor, counts: list[int], window: list[int]) -> torch.Tensor:
    """(B, *padded, C) -> (B * windows, positions per window, C), windows in row-major order."""
    k = len(window)
    split = x.reshape(x.shape[0], *[d for pair in zip(counts, window) for d in pair], x.shape[-1])
    order = [0, *range(1, 2 * k, 2), *range(2, 2 * k + 1, 2), 2 * k + 1]
    return split.permute(order).reshape(-1, math.prod(window), x.shape[-1])


def _from_windows(w: torch.Tensor, b: int, counts: list[int], window: list[int]) -> torch.Tensor:
    """The inverse of ``_to_windows``."""
    k = len(window)
    grid = w.reshape(b, *counts, *window, w.shape[-1])
    order = [0, *[i for j in range(k) for i in (1 + j, 1 + k + j)], 2 * k + 1]
    return grid.permute(order).reshape(b, *[c * s for c, s in zip(counts, window)], w.shape[-1])


def _shift_mask(padded: list[int], window: list[int], shift: list[int]) -> torch.Tensor:
    """(windows, n, n): -100 between two positions of one window that the cyclic shift brought
    together from different regions of the feature map, 0 elsewhere."""
    region = torch.zeros(padded)
    for axis, (size, win, s) in enumerate(zip(padded, window, shift)):
        band = torch.zeros(size)
        if s:  # three bands along a shifted axis: [0, size-win), [size-win, size-s), [size-s, size)
            band[size - win:] = 1
            band[size - s:] = 2
        region = region * 3 + band.view([-1 if d == axis else 1 for d in range(len(padded))])
    ids = _to_windows(region[None, ..., None], [p // w for p, w in zip(padded, window)], window)[..., 0]
    return torch.where(ids[:, None, :] != ids[:, :, None], -100.0, 0.0)


def window_and_shift_size(shift_size: list[int], size_dhw: list[int], window_size: list[int]) -> tuple[list[int], list[int]]:
    """torchvision's video Swin ``_get_window_and_shift_size`` on copies: it changes its list arguments
    in place, which a traced graph's arguments do not allow."""
    from torchvision.models.video import swin_transformer

    return swin_transformer._get_window_and_shift_size(list(shift_size), list(size_dhw), list(window_size))


def channel_shuffle(input: torch.Tensor, groups: int) -> torch.Tensor:  # noqa: A002 - F.channel_shuffle's names
    """torchvision's ``shufflenetv2.channel_shuffle`` in two ops, where its Python traces to ten (the size
    arithmetic, a view into groups, a transpose, a contiguous copy, a view back) that every pass walks, 16
    times in ShuffleNetV2: ``F.channel_shuffle``'s kernel gives the same values in half the time at batch 1
    (116x28x28: 6 us against 14 us), contiguous as torchvision's are for any input."""
    return F.channel_shuffle(input, groups).contiguous()


def library_functions() -> dict[Any, Any]:
    """Leaf functions of library models (``torch.fx.wrap``) -> the replacement the captured graph calls."""
    from torchvision.models import swin_transformer
    from torchvision.models.video import swin_transformer as video_swin

    return {
        swin_transformer.shifted_window_attention: shifted_window_attention,
        video_swin.shifted_window_attention_3d: shifted_window_attention,
        video_swin._get_window_and_shift_size: window_and_shift_size,
    }


def inlined_functions() -> dict[Any, Any]:
    """Library functions -> the function of torch ops whose trace takes their place in the captured graph."""
    from torchvision.models import shufflenetv2

    return {shufflenetv2.channel_shuffle: channel_shuffle}
