"""Rules for contracting ops: conv, linear and matmul read the labels of the contracted dim and
produce fresh ones; an embedding produces fresh ones from its weight's dim 1.

The contracted input labels are bound to the weight's input dim and recorded as a consumer (the
verification oracle masks that input); fresh output labels are bound to the weight's output dim and
bias. Grouped convs keep their group count (every group loses the same positions); a depthwise conv
ties each output channel to its input channel, and its group count follows the pruned width.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ...core.fxutil import arg
from ...core.groups import Family, Patch, PatchKind, Role
from ...core.optable import CONV_FUNCS, MATMUL, canonical
from .labels import Labels, Param
from .state import State, Unsupported, family, handles, owner, target_name


@handles(nn.modules.conv._ConvNd)
@family(Family.CONTRACT)
def conv_module(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Labels:
    """``nn.Conv*d`` and ``nn.ConvTranspose*d``."""
    mod = s.modules[node.target]
    bias = f"{node.target}.bias" if mod.bias is not None else None
    return conv(s, node, Param(f"{node.target}.weight", mod.weight), bias, mod.groups, mod.transposed)


@handles(CONV_FUNCS)
@family(Family.CONTRACT)
def conv_function(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Labels:
    """``F.conv*d`` and ``F.conv_transpose*d`` with a parameter as weight."""
    weight, bias = parameters(node, args, kwargs)
    groups = arg(node.args, node.kwargs, 6, "groups", 1)
    if not isinstance(groups, int):
        raise Unsupported(f"{target_name(node)} at node {node.name} computes its group count")
    return conv(s, node, weight, bias, groups, CONV_FUNCS[canonical(node.target)])


@handles(nn.Linear)
@family(Family.CONTRACT)
def linear_module(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Labels:
    mod = s.modules[node.target]
    bias = f"{node.target}.bias" if mod.bias is not None else None
    return linear(s, node, Param(f"{node.target}.weight", mod.weight), bias)


@handles(F.linear)
@family(Family.CONTRACT)
def linear_function(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Labels:
    """``F.linear`` with a parameter as weight."""
    return linear(s, node, *parameters(node, args, kwargs))


@handles(nn.Embedding)
def embedding_module(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Labels:
    return embedding(s, node, Param(f"{node.target}.weight", s.modules[node.target].weight))


@handles(F.embedding, torch.embedding)
def embedding_function(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Labels:
    """``F.embedding(input, weight)``, or ``torch.embedding(weight, input)`` (the aten op's order)."""
    return embedding(s, node, arg(args, kwargs, 1, "weight") if canonical(node.target) is F.embedding else args[0])


def embedding(s: State, node: torch.fx.Node, w: Any) -> Labels:
    """A lookup of rows of a parameter: the output's last dim is the weight's dim 1, which a tied output
    layer (a linear reading the same weight) shares."""
    if not isinstance(w, Param) or w.tensor.dim() != 2:
        raise Unsupported(f"{target_name(node)} at node {node.name} looks up rows of a computed or non-2-d weight")
    out_shape = s.shape(node)
    ids = s.uf.fresh(w.tensor.shape[1])
    who = owner(node)
    s.bind(w.name, 1, ids, who, Role.OUT)
    if node.op == "call_module":
        s.patches.append(Patch(PatchKind.ATTR, who, node.name, len(out_shape) - 1, field="embedding_dim"))
    return Labels(out_shape, len(out_shape) - 1, ids)


def parameters(node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Param, str | None]:
    """The weight and the bias's name of a functional conv or linear; both must be parameters."""
    weight, bias = arg(args, kwargs, 1, "weight"), arg(args, kwargs, 2, "bias")
    if not isinstance(weight, Param) or not (bias is None or isinstance(bias, Param)):
        raise Unsupported(f"{target_name(node)} at node {node.name} computes its weight or bias")
    return weight, bias.name if bias is not None else None


def conv(s: State, node: torch.fx.Node, w: Param, bias: str | None, groups: int, transposed: bool) -> Labels:
    src, x = s.input_of(node)
    who = owner(node)
    wt = w.tensor
    c_in = wt.shape[0] if transposed else wt.shape[1] * groups
    c_out = wt.shape[1] * groups if transposed else wt.shape[0]
    in_dim, out_dim = (0, 1) if transposed else (1, 0)
    if x.dim == 0 and x.shape[0] > 1:
        # Channels folded into the batch dim (attention heads pooled one by one) pass through the
        # conv, which works sample by sample; its own channels then cannot be pruned.
        s.flops(node, [x.ids])
        return x.with_shape(s.shape(node))
    if x.dim not in (None, 1):
        s.freeze(x, f"{who} reads channels on dim 1, but channels vary along dim {x.dim} here")
    xin = x.ids if x.dim == 1 else x.ids[:1].expand(c_in)
    if groups > 1 and groups == c_in:  # depthwise: each output channel belongs to one input channel
        out_ids = xin.repeat_interleave(c_out // c_in)
        if transposed:
            s.bind(w.name, 0, xin, who, Role.IN)
        else:
            s.bind(w.name, 0, out_ids, who, Role.OUT)
        factors = [out_ids]
        if node.op == "call_module":
            s.patches.append(Patch(PatchKind.ATTR, who, src.name, 1, field="groups"))
        else:
            path = ("args", 6) if len(node.args) > 6 else ("kwargs", "groups")
            s.patches.append(Patch(PatchKind.ARG, node.name, src.name, 1, path=path))
    else:
        ipg, opg = c_in // groups, c_out // groups
        out_ids = s.uf.fresh(c_out)
        if groups > 1:  # every group loses the same positions, so the group count can stay
            s.uf.union_pairs(xin, xin[:ipg].repeat(groups))
            s.uf.union_pairs(out_ids, out_ids[:opg].repeat(groups))
        w_in = xin if transposed else xin[:ipg]
        w_out = out_ids[:opg] if transposed else out_ids
        s.bind(w.name, in_dim, w_in, who, Role.IN)
        s.bind(w.name, out_dim, w_out, who, Role.OUT)
        s.consumers.append((node.name, 0, 1))
        factors = [w_in, w_out]
    if bias is not None:
        s.bind(bias, 0, out_ids, who, Role.OUT)
    s.flops(node, factors)
    if node.op == "call_module":
        s.patches.append(Patch(PatchKind.ATTR, who, src.name, 1, field="in_channels"))
        s.patches.append(Patch(PatchKind.ATTR, who, node.name, 1, field="out_channels"))
    return Labels(s.shape(node), 1, out_ids)


@handles(torch.addmm)
@family(Family.CONTRACT)
def addmm(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Labels:
    """``torch.addmm(bias, x, weight)`` with parameters: a linear whose weight is stored (in, out), as
    GPT-2's Conv1D computes it."""
    bias, weight = arg(args, kwargs, 0, "input"), arg(args, kwargs, 2, "mat2")
    scaled = arg(args, kwargs, 3, "beta", 1) != 1 or arg(args, kwargs, 4, "alpha", 1) != 1
    if not isinstance(weight, Param) or not isinstance(bias, Param) or bias.tensor.dim() != 1 or scaled:
        raise Unsupported(f"addmm at node {node.name} is not a bias plus input times a weight parameter")
    return linear(s, node, Param(weight.name, weight.tensor), bias.name, at=1, stored_in_out=not weight.transposed)


def linear(s: State, node: torch.fx.Node, w: Param, bias: str | None, at: int = 0, stored_in_out: bool = False) -> Labels:
    """``x @ w.T + bias``, ``x`` being argument ``at`` of ``node``; ``stored_in_out``: ``w`` is (in, out)."""
    src, x = s.input_of(node, at)
    if w.tensor.dim() != 2:
        raise Unsupported(f"linear at node {node.name} has a {w.tensor.dim()}-d weight")
    who = owner(node)
    out_shape = s.shape(node)
    last = len(x.shape) - 1
    in_dim, out_dim = (0, 1) if stored_in_out else (1, 0)
    n_out, n_in = w.tensor.shape[out_dim], w.tensor.shape[in_dim]
    if x.dim not in (None, last) and x.shape[x.dim] > 1:
        # Channels vary along a dim the linear does not contract: they pass through unchanged,
        # and the linear's own output features cannot be pruned.
        s.flops(node, [x.ids])
        return x.with_shape(out_shape)
    xin = x.ids if x.dim == last else x.ids[:1].expand(n_in)
    out_ids = s.uf.fresh(n_out)
    s.bind(w.name, in_dim, xin, who, Role.IN)
    s.bind(w.name, out_dim, out_ids, who, Role.OUT)
    if bias is not None:
        s.bind(bias, 0, out_ids, who, Role.OUT)
    s.consumers.append((node.name, at, last))
    s.flops(node, [xin, out_ids])
    if node.op == "call_module":
        s.patches.append(Patch(PatchKind.ATTR, who, src.name, last, field="in_features"))
        s.patches.append(Patch(PatchKind.ATTR, who, node.name, len(out_shape) - 1, field="out_features"))
    return Labels(out_shape, len(out_shape) - 1, out_ids)


@handles(MATMUL)
@family(Family.CONTRACT)
def matmul(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Labels:
    """matmul / bmm / mm of two tensors: the contracted dims are tied, one operand's labels may pass;
    labels along the same batch dim of both (attention heads) are tied and passed."""
    if len(args) != 2 or kwargs:
        raise Unsupported(f"matmul at node {node.name} takes its operands by keyword")
    w = args[1]
    if isinstance(w, Param) and w.tensor.dim() == 2 and w.name not in s.param_labels and isinstance(node.args[0], torch.fx.Node):
        return linear(s, node, Param(w.name, w.tensor), None, stored_in_out=not w.transposed)  # x @ weight, x @ weight.T
    a, b = (s.labels(v, node) for v in args)
    if len(a.shape) < 2 or len(b.shape) < 2:
        raise Unsupported(f"matmul with a 1-d operand at node {node.name}")
    out_shape = s.shape(node)
    ad = None if a.dim is None or a.shape[a.dim] == 1 else a.dim - len(a.shape)
    bd = None if b.dim is None or b.shape[b.dim] == 1 else b.dim - len(b.shape)
    factors: list[torch.Tensor] = []
    if ad == -1 and bd == -2:
        s.uf.union_pairs(a.ids, b.ids)
    if ad == -1 or bd == -2:
        factors.append(a.ids if ad == -1 else b.ids)
        if ad == -1:
            s.consumers.append((node.name, 0, len(a.shape) - 1))
        if bd == -2:
            s.consumers.append((node.name, 1, len(b.shape) - 2))
    carried = [(lab, d) for lab, d, contracted in ((a, ad, -1), (b, bd, -2)) if d is not None and d != contracted]
    if len(carried) == 2 and carried[0][1] == carried[1][1] <= -3:  # the same batch dim (heads): tied
        s.uf.union_pairs(a.ids, b.ids)
        carried = carried[:1]
    if len(carried) > 1:
        for lab, _ in carried:
            s.freeze(lab, f"matmul at node {node.name} keeps channels of both operands")
        carried = []
    s.flops(node, factors + [lab.ids for lab, _ in carried])
    if carried:
        lab, d = carried[0]
        return Labels(out_shape, len(out_shape) + d, lab.ids)
    return Labels(out_shape, None, s.uf.fresh(1))


@handles(torch.einsum)
@family(Family.CONTRACT)
def einsum(s: State, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Labels:
    """``torch.einsum`` of one or two operands, any equation without repeated subscripts in one operand.

    The subscript each tensor's channels vary along decides: one shared by every operand that has it is
    tied across them; contracted (not in the output), it is read channel-wise (a consumer); kept, the
    output carries it. A parameter operand is a weight: its dim of a labelled subscript is bound to those
    channels, and its one kept subscript that no tensor labels gets fresh output channels. A subscript
    that only part of its operands label, that one operand sums away, or a second kept one (labels follow
    one dim) freezes those channels.
    """
    listed = len(args) == 2 and isinstance(args[1], (list, tuple))  # einsum(eq, [a, b]), as aten has it
    operands = tuple(args[1]) if listed else args[1:]
    if kwargs or not isinstance(args[0], str) or len(operands) not in (1, 2):
        raise Unsupported(f"einsum at node {node.name} takes other than an equation and one or two tensors")
    equation = args[0]
    where = (lambda i: (1, i)) if listed else (lambda i: i + 1)  # an operand's place in the node's args
    weight = [isinstance(v, Param) and v.name not in s.param_labels for v in operands]
    labs = [None if w else s.labels(v, node) for v, w in zip(operands, weight)]
    shapes = [tuple(v.tensor.shape) if lab is None else lab.shape for v, lab in zip(operands, labs)]
    inputs, output = einsum_subscripts(equation, [len(shape) for shape in shapes])
    if any(len(set(letters)) < len(letters) for letters in inputs):
        raise Unsupported(f"einsum at node {node.name} repeats a subscript in one operand ({equation!r})")
    who = owner(node)
    channel: dict[str, list[tuple[int, Labels]]] = {}
    for i, (lab, letters) in enumerate(zip(labs, inputs)):
        if lab is not None and lab.dim is not None and lab.shape[lab.dim] > 1:
            channel.setdefault(letters[lab.dim], []).append((i, lab))
    for i, (v, letters) in enumerate(zip(operands, inputs)):  # weights: bind the labelled subscripts' dims
        if weight[i]:
            for d, letter in enumerate(letters):
                if letter in channel and shapes[i][d] > 1:
                    s.bind(v.name, d, channel[letter][0][1].ids, who, Role.IN)
                    channel[letter].append((i, Labels(shapes[i], d, channel[letter][0][1].ids)))
    fresh = [(i, d, letter) for i, w in enumerate(weight) if w for d, letter in enumerate(inputs[i])
             if letter in output and letter not in channel and shapes[i][d] > 1
             and all(letter not in inputs[j] for j in range(len(operands)) if j != i)]
    if len(fresh) == 1 and not any(letter in output for letter in channel):
        i, d, letter = fresh[0]
        ids = s.uf.fresh(shapes[i][d])
        s.bind(operands[i].name, d, ids, who, Role.OUT)
        channel[letter] = [(i, Labels(shapes[i], d, ids))]
    factors, carried = [], []
    for letter, found in channel.items():
        holders = [i for i, letters in enumerate(inputs) if letter in letters and shapes[i][letters.index(letter)] > 1]
        kept = letter in output
        if len(found) < len(holders) or (not kept and len(found) < 2):
            s.freeze([lab for _, lab in found], f"einsum at node {node.name} ({equation!r}) reads subscript {letter!r} "
                                                 "of these channels without channels in every operand, or sums it away")
            continue
        for (_, a), (_, b) in zip(found, found[1:]):
            s.uf.union_pairs(a.ids, b.ids)
        if kept:
            carried.append((letter, found))
        else:
            s.consumers.extend((node.name, where(i), lab.dim) for i, lab in found if not weight[i])
        factors.append(found[0][1].ids)
    out_shape = s.shape(node)
    if len(carried) > 1:
        for _, found in carried:
            s.freeze([lab for _, lab in found], f"einsum at node {node.name} ({equation!r}) keeps channels along two subscripts")
        carried = []
    s.flops(node, factors)
    if carried:
        letter, found = carried[0]
        return Labels(out_shape, output.index(letter), found[0][1].ids)
    return Labels(out_shape, None, s.uf.fresh(1))


def einsum_subscripts(equation: str, ndims: list[int]) -> tuple[list[list[str]], list[str]]:
    """The subscripts of each operand and of the output of an einsum ``equation``, one token per dim;
    ``...`` becomes tokens ``...0``, ``...1``, ... aligned from the right, as einsum broadcasts them."""
    lhs, arrow, rhs = equation.replace(" ", "").partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ndims):
        raise Unsupported(f"einsum equation {equation!r} names {len(terms)} operands, got {len(ndims)}")
    spans = [nd - len(t.replace("...", "")) if "..." in t else 0 for t, nd in zip(terms, ndims)]
    width = max(spans, default=0)

    def tokens(term: str, span: int) -> list[str]:
        head, dots, tail = term.partition("...")
        return [*head, *(f"...{k}" for k in range(width - span, width) if dots), *tail]

    inputs = [tokens(t, n) for t, n in zip(terms, spans)]
    if arrow:
        output = tokens(rhs, width)
    else:
        seen = [x for letters in inputs for x in letters if not x.startswith("...")]
        output = [f"...{k}" for k in range(width)] + sorted(x for x in set(seen) if seen.count(x) == 1)
    return inputs, output
