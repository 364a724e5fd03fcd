"""verify: check numerically that a rewrite did exactly what its plan says.

The oracle is the original graph in which every removed channel is multiplied by zero where a
contraction (conv, linear, matmul) reads it. For a channel-separable graph the pruned model must equal
it up to float rounding. LayerNorm and GroupNorm over pruned channels compute their statistics over the
kept channels in the pruned model, so the oracle uses masked statistics there: the check stays exact,
and ``DependencyGraph.notes`` tells the user that these layers' outputs do change with pruning
(``DependencyGraph.masked_norms`` names them).
When a plan drops classes (output channels), the oracle's output keeps only the kept ones.
A model captured from one run of its ops (a detector) has a module tree as result; its oracle is a
copy of that tree with the same zeros put into the weights that read removed channels (``verify_tree``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch.fx.node import map_aggregate, map_arg

import torch.nn.functional as F
from torch import nn

from ..core import metakeys as keys
from ..core.decisions import Decisions
from ..errors import VerificationError
from ..core.fxutil import arg, copy_graph, eval_mode, graph_module, is_get_attr, structural_copy
from ..core.groups import DependencyGraph
from ..core.masks import kept_mask
from ..core.optable import CONV_FUNCS, MEAN, canonical

__all__ = ["verify", "verify_tree", "verify_same", "build_oracle", "masked_tree", "VerifyResult"]


def masked_layer_norm(x: torch.Tensor, mask: torch.Tensor, weight: Any, bias: Any, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim using only the positions where ``mask`` is 1."""
    n = mask.sum()
    mean = (x * mask).sum(-1, keepdim=True) / n
    var = (((x - mean) * mask) ** 2).sum(-1, keepdim=True) / n
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """The mean over ``dim`` of the positions where ``mask`` is 1."""
    return (x * mask).sum(dim, keepdim=keepdim) / mask.sum()


def masked_group_norm(x: torch.Tensor, mask: torch.Tensor, groups: int, weight: Any, bias: Any, eps: float) -> torch.Tensor:
    """GroupNorm over channel dim 1 using only the channels where ``mask`` is 1."""
    n, c = x.shape[:2]
    xg = x.reshape(n, groups, c // groups, -1)
    mg = mask.reshape(1, groups, c // groups, 1)
    count = mg.sum(2, keepdim=True) * xg.shape[-1]
    mean = (xg * mg).sum((2, 3), keepdim=True) / count
    var = (((xg - mean) * mg) ** 2).sum((2, 3), keepdim=True) / count
    y = ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    shape = [1, c] + [1] * (x.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def _arg_at(args: tuple[Any, ...], pos: int | tuple[int, int]) -> Any:
    """A node argument by position, or an item of a list argument (``einsum(eq, [a, b])``)."""
    return args[pos] if isinstance(pos, int) else args[pos[0]][pos[1]]


def _with_arg(args: tuple[Any, ...], pos: int | tuple[int, int], value: Any) -> tuple[Any, ...]:
    if isinstance(pos, int):
        return tuple(value if i == pos else a for i, a in enumerate(args))
    items = list(args[pos[0]])
    items[pos[1]] = value
    return _with_arg(args, pos[0], type(args[pos[0]])(items))


class _OracleBuilder:
    def __init__(self, gm: torch.fx.GraphModule, deps: DependencyGraph, removed: torch.Tensor) -> None:
        self.gm, self.deps, self.removed = gm, deps, removed
        self.masks: dict[str, torch.Tensor] = {}
        self.modules = dict(gm.named_modules())

    def mask_for(self, node: torch.fx.Node, dim: int) -> torch.Tensor | None:
        keep = _kept_along(self.deps, self.removed, node, dim)
        if keep is None:
            return None
        shape = [1] * len(node.meta[keys.TENSOR_META].shape)
        shape[dim] = -1
        return keep.to(node.meta[keys.TENSOR_META].dtype).reshape(shape)

    def mask_node(self, g: torch.fx.Graph, mask: torch.Tensor) -> torch.fx.Node:
        name = f"_fxprune_mask{len(self.masks)}"
        self.masks[name] = mask
        return g.get_attr(name)

    def build(self) -> torch.fx.GraphModule:
        g, val_map, out = copy_graph(self.gm.graph)
        old = {n.name: n for n in self.gm.graph.nodes}
        with g.inserting_before(out):
            out.args = (map_arg(out.args[0], lambda n: self.kept_output(g, n)),)
        for name, pos, dim in self.deps.consumers:
            new = val_map[old[name]]
            src = _arg_at(old[name].args, pos)
            mask = self.mask_for(src, dim)
            if mask is not None:
                with g.inserting_before(new):
                    masked = g.call_function(torch.mul, (val_map[src], self.mask_node(g, mask)))
                new.args = _with_arg(new.args, pos, masked)
        for name in self.deps.masked_norms:
            self.replace_norm(g, old[name], val_map[old[name]])
        return graph_module(self.gm, g, self.masks)

    def kept_output(self, g: torch.fx.Graph, node: torch.fx.Node) -> torch.fx.Node:
        """``node``, an output, without its removed channels (only a plan that drops classes removes any)."""
        entry = self.deps.tensor_atoms.get(node.name)
        if entry is None:
            return node
        keep = kept_mask(self.removed, entry[1])
        if bool(keep.all()):
            return node
        return g.call_function(torch.index_select, (node, entry[0], self.mask_node(g, keep.nonzero().flatten())))

    def replace_norm(self, g: torch.fx.Graph, old: torch.fx.Node, new: torch.fx.Node) -> None:
        src = old.args[0]
        entry = self.deps.tensor_atoms.get(src.name)
        if entry is None:
            return
        dim = entry[0]
        mask = self.mask_for(src, dim)
        if mask is None:
            return
        with g.inserting_before(new):
            repl = self.masked_statistic(g, old, new, self.mask_node(g, mask), dim)
        new.replace_all_uses_with(repl)
        g.erase_node(new)

    def masked_statistic(self, g: torch.fx.Graph, old: torch.fx.Node, new: torch.fx.Node, m: torch.fx.Node, dim: int) -> torch.fx.Node:
        """A call that computes ``old``'s norm or mean over the channels that mask ``m`` keeps."""
        if old.op != "call_module" and canonical(old.target) in MEAN:
            return g.call_function(masked_mean, (new.args[0], m, dim, bool(arg(old.args, old.kwargs, 2, "keepdim", False))))
        if old.op == "call_module":
            mod = self.modules[old.target]
            w = g.get_attr(f"{old.target}.weight") if getattr(mod, "weight", None) is not None else None
            b = g.get_attr(f"{old.target}.bias") if getattr(mod, "bias", None) is not None else None
            groups, eps = getattr(mod, "num_groups", None), mod.eps
        else:
            kw = new.normalized_arguments(self.gm, normalize_to_only_use_kwargs=True).kwargs
            w, b, eps, groups = kw["weight"], kw["bias"], kw["eps"], kw.get("num_groups")
        if groups is not None:
            return g.call_function(masked_group_norm, (new.args[0], m, groups, w, b, eps))
        return g.call_function(masked_layer_norm, (new.args[0], m, w, b, eps))


def build_oracle(gm: torch.fx.GraphModule, deps: DependencyGraph, removed: torch.Tensor) -> torch.fx.GraphModule:
    """The original graph with removed channels zeroed at every contraction that reads them."""
    return _OracleBuilder(gm, deps, removed).build()


@dataclass(frozen=True)
class VerifyResult:
    """The largest error between the pruned model and the oracle, relative to its tolerance."""

    max_abs_error: float
    tolerance: float


def _leaves(x: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    map_aggregate(x, lambda v: out.append(v) if isinstance(v, torch.Tensor) else v)
    if isinstance(x, dict) and not out:
        for v in x.values():
            out.extend(_leaves(v))
    return out


def _bug(module: str) -> str:
    """What a verification error adds when the pruned model is at fault: a coupling bug, and which ``module`` to ignore."""
    return f" This is a bug in fxprune's coupling analysis; please report it with the model. Workaround: put the module {module} in ignore=."


def compare(want: list[torch.Tensor], got: list[torch.Tensor], rtol: float, names: tuple[str, str] = ("the masked original", "the pruned model"),
            blame: str = _bug("that feeds the wrong channels")) -> VerifyResult:
    """The oracle's outputs ``want`` against the pruned model's ``got``; VerificationError if they differ. ``names``: what
    gave ``want`` and ``got``, and ``blame``: what the message adds, for other pairs (``verify_same``)."""
    if len(want) != len(got):
        raise VerificationError(f"{names[1]} returns {len(got)} tensors, {names[0]} {len(want)}")
    worst = VerifyResult(0.0, 0.0)
    for i, (a, b) in enumerate(zip(want, got)):
        if a.shape != b.shape:
            raise VerificationError(f"output {i}: {names[1]} gives shape {tuple(b.shape)}, {names[0]} {tuple(a.shape)}")
        if not a.is_floating_point():
            if not torch.equal(a, b):
                raise VerificationError(f"output {i} differs between {names[1]} and {names[0]}")
            continue
        scale = float(a.abs().max()) if a.numel() else 0.0
        err = float((a - b).abs().max()) if a.numel() else 0.0
        tol = rtol * scale + torch.finfo(a.dtype).tiny
        if not err <= tol:
            raise VerificationError(f"output {i}: {names[1]} differs from {names[0]} by {err:.3g} (tolerance {tol:.3g}, "
                                    f"output scale {scale:.3g}).{blame}")
        if err / max(tol, 1e-30) >= worst.max_abs_error / max(worst.tolerance, 1e-30):
            worst = VerifyResult(err, tol)
    return worst


def verify(
    gm: torch.fx.GraphModule,
    pruned: torch.fx.GraphModule,
    deps: DependencyGraph,
    removed: torch.Tensor,
    example_inputs: Sequence[Any],
    rtol: float = 1e-4,
) -> VerifyResult:
    """Run oracle and pruned model on ``example_inputs``; raise VerificationError if they differ.

    Tolerance: ``rtol * max|oracle output|``, per output tensor, purely relative so that tiny outputs
    are checked as strictly as large ones (float32 rounding of reordered sums stays far below it; a
    wrong channel gives errors of the order of the outputs themselves).
    """
    oracle = build_oracle(gm, deps, removed)
    with torch.no_grad(), eval_mode(oracle), eval_mode(pruned):
        want = _leaves(oracle(*example_inputs))
        got = _run_pruned(pruned, example_inputs)
    return compare(want, got, rtol)


def _run_pruned(pruned: nn.Module, example_inputs: Sequence[Any], name: str = "the pruned model",
                blame: str = _bug("around the failing node")) -> list[torch.Tensor]:
    try:
        return _leaves(pruned(*example_inputs))
    except VerificationError:
        raise
    except Exception as exc:
        raise VerificationError(f"{name} fails to run: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}.{blame}") from exc


def _input_mask(w: torch.Tensor, keep: torch.Tensor, groups: int, transposed: bool) -> torch.Tensor:
    """A 0/1 tensor shaped like a conv or linear weight ``w`` that zeroes the input channels ``keep`` drops."""
    k = [1] * (w.dim() - 2)
    if transposed:  # (in, out / groups, *kernel)
        return keep.reshape(-1, 1, *k)
    out, per_group = w.shape[0], w.shape[1]
    return keep.reshape(groups, 1, per_group).expand(groups, out // groups, per_group).reshape(out, per_group, *k)


def masked_tree(gm: torch.fx.GraphModule, deps: DependencyGraph, removed: torch.Tensor) -> nn.Module:
    """The oracle of an ops-run capture: a copy of the module tree it recorded in which every conv and
    linear weight that reads a removed channel has that input column zeroed, and every norm of
    ``deps.masked_norms`` computes its statistics over the kept channels."""
    oracle = structural_copy(gm.meta[keys.TREE])
    modules = dict(oracle.named_modules())
    nodes = {n.name: n for n in gm.graph.nodes}
    for name, pos, dim in deps.consumers:
        node = nodes[name]
        keep = _kept_along(deps, removed, _arg_at(node.args, pos), dim)
        if keep is None:
            continue
        weight = arg(node.args, node.kwargs, 1, "weight")
        t = canonical(node.target)
        if not (t in CONV_FUNCS or t is F.linear) or pos != 0 or not is_get_attr(weight):
            raise VerificationError(f"node {name} ({node.target}) reads pruned channels, but not as the input of a conv "
                                    "or linear weight; fxprune checks a module tree only there. Put the module around it in ignore=.")
        owner, _, field = weight.target.rpartition(".")
        mod = modules[owner]
        w = getattr(mod, field)
        groups = arg(node.args, node.kwargs, 6, "groups", 1)
        mask = _input_mask(w, keep.to(w.dtype), groups if t in CONV_FUNCS else 1, CONV_FUNCS.get(t, False))
        mod._parameters[field] = nn.Parameter(w.detach() * mask, requires_grad=False)
    for name in deps.masked_norms:
        node = nodes[name]
        weight = node.args[2] if len(node.args) > 2 else None
        keep = _kept_along(deps, removed, node.args[0], None)
        if keep is None:
            continue
        mod = modules.get(weight.target.rpartition(".")[0]) if is_get_attr(weight) else None
        if not isinstance(mod, (nn.GroupNorm, nn.LayerNorm)):
            raise VerificationError(f"node {name} normalizes over pruned channels outside a GroupNorm or LayerNorm module; "
                                    "fxprune checks a module tree only there. Put the module around it in ignore=.")
        mod.register_forward_hook(_masked_norm_hook(keep.to(mod.weight.dtype)))
    return oracle


def _masked_norm_hook(keep: torch.Tensor) -> Any:
    def hook(m: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        if isinstance(m, nn.GroupNorm):
            return masked_group_norm(args[0], keep, m.num_groups, m.weight, m.bias, m.eps)
        return masked_layer_norm(args[0], keep, m.weight, m.bias, m.eps)

    return hook


def _kept_along(deps: DependencyGraph, removed: torch.Tensor, node: Any, dim: int | None) -> torch.Tensor | None:
    """Kept mask of ``node``'s channels along ``dim`` (None: its channel dim), or None when all are kept."""
    entry = deps.tensor_atoms.get(node.name) if isinstance(node, torch.fx.Node) else None
    if entry is None or (dim is not None and entry[0] != dim):
        return None
    keep = kept_mask(removed, entry[1])
    return None if bool(keep.all()) else keep


def verify_tree(
    gm: torch.fx.GraphModule,
    result: nn.Module,
    deps: DependencyGraph,
    removed: torch.Tensor,
    example_inputs: Sequence[Any],
    rtol: float = 1e-4,
) -> VerifyResult:
    """``verify`` for an ops-run capture (a detector): the masked module tree (``masked_tree``) against
    the pruned copy, the second run taking the first run's decisions (``decisions.Decisions``) so that
    a near-tie in top-k or NMS, decided the other way by float rounding, cannot make them differ."""
    oracle = masked_tree(gm, deps, removed)
    decisions = Decisions()
    with torch.no_grad(), eval_mode(oracle), eval_mode(result):
        with decisions.record():
            want = _leaves(oracle(*example_inputs))
        with decisions.replay():
            got = _run_pruned(result, example_inputs)
    return compare(want, got, rtol)


def verify_same(reference: nn.Module, result: nn.Module, example_inputs: Sequence[Any], rtol: float = 1e-4) -> VerifyResult:
    """``result``, a model built anew from the verified pruned graph ``reference`` (a Hugging Face model of
    the original's class), against that graph on the example inputs: its own forward must agree."""
    with torch.no_grad(), eval_mode(result):
        names = ("the pruned graph", f"{type(result).__name__} built from the solved config")
        return compare(_leaves(reference(*example_inputs)), _run_pruned(result, example_inputs, names[1], ""), rtol, names, "")
