"""Selectors that read nothing but the model: no ranking (uniform), random, the Lp norm of each
atom's weights, and the scale of the norm layer that follows it (bn_scale)."""

from __future__ import annotations

import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..core.groups import DependencyGraph, Member
from ..core.optable import canonical
from ..errors import ArgumentError
from .protocol import Scores

__all__ = ["Uniform", "Random", "LpNorm", "L1", "L2", "BNScale", "norm_weights"]


class Uniform:
    """No ranking: every group keeps its first atoms, in channel order."""

    name = "uniform"

    def scores(self, deps: DependencyGraph, gm: torch.fx.GraphModule) -> Scores:
        return {g.id: -torch.arange(g.width, dtype=torch.float64) for g in deps.prunable_groups}


class Random:
    """Uniform random scores from torch's global generator, which ``compile`` seeds with ``seed=``."""

    name = "random"

    def scores(self, deps: DependencyGraph, gm: torch.fx.GraphModule) -> Scores:
        return {g.id: torch.rand(g.width, dtype=torch.float64) for g in deps.prunable_groups}


def _state(gm: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    return {**dict(gm.named_parameters()), **dict(gm.named_buffers())}


def _lp_sums(deps: DependencyGraph, state: dict[str, torch.Tensor], members: list[Member], p: float) -> torch.Tensor:
    """Per atom (all atoms of ``deps``): the sum of ``|w|^p`` over the slices of ``members`` it owns."""
    total = torch.zeros(deps.num_atoms, dtype=torch.float64)
    for m in members:
        t = state[m.name].detach().to(torch.float64).abs() ** p
        total.index_add_(0, deps.member_atoms[(m.name, m.dim)], t.movedim(m.dim, 0).reshape(t.shape[m.dim], -1).sum(1))
    return total


class LpNorm:
    """Lp norm of the weights that produce each atom (output slices of conv/linear weights, all of them
    taken as one vector). Groups with no producing weight (a parameter used element-wise) fall back to
    all their members."""

    def __init__(self, p: float) -> None:
        if not p > 0:
            raise ArgumentError(f"LpNorm needs p > 0, got {p}")
        self.p = p
        self.name = f"l{p:g}"

    def scores(self, deps: DependencyGraph, gm: torch.fx.GraphModule) -> Scores:
        state, out = _state(gm), {}
        for g in deps.prunable_groups:
            members = [m for m in g.members if m.role == "out"] or list(g.members)
            out[g.id] = _lp_sums(deps, state, members, self.p)[g.atoms] ** (1 / self.p)
        return out


class L1(LpNorm):
    """L1 norm of the weights that produce each atom."""

    name = "l1"

    def __init__(self) -> None:
        super().__init__(1)


class L2(LpNorm):
    """L2 norm of the weights that produce each atom."""

    name = "l2"

    def __init__(self) -> None:
        super().__init__(2)


_NORM_MODULES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
_NORM_FUNCS = {F.batch_norm, F.instance_norm, F.group_norm, F.layer_norm}
_PRODUCTS = {torch.mul, operator.mul}


def _scale(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str | None:
    """The 1-d parameter that ``node``, an element-wise product, scales its other operand by (an RMSNorm's
    gamma, as tracing and torch.export record ``weight * x``), else None."""
    if node.op != "call_function" or canonical(node.target) not in _PRODUCTS or len(node.args) != 2:
        return None
    params = dict(gm.named_parameters())
    names = [a.target for a in node.args if isinstance(a, torch.fx.Node) and a.op == "get_attr" and a.target in params]
    return names[0] if len(names) == 1 and params[names[0]].dim() == 1 else None


def norm_weights(gm: torch.fx.GraphModule) -> set[str]:
    """Qualified names of the affine weights (gamma) of the normalization layers ``gm`` calls, and of the
    1-d parameters that scale a tensor element-wise (RMSNorm's gamma, which graphs record as a product)."""
    modules = dict(gm.named_modules())
    found = {name for node in gm.graph.nodes if (name := _scale(gm, node)) is not None}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], _NORM_MODULES):
            if getattr(modules[node.target], "weight", None) is not None:
                found.add(f"{node.target}.weight")
        elif node.op == "call_function" and canonical(node.target) in _NORM_FUNCS:
            args = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
            weight = args.kwargs.get("weight") if args is not None else None
            if isinstance(weight, torch.fx.Node) and weight.op == "get_attr":
                found.add(weight.target)
    return found


class BNScale:
    """|gamma| of the normalization layers (BatchNorm, InstanceNorm, GroupNorm, LayerNorm) that scale each
    atom, summed when several do; groups without a norm weight fall back to l1."""

    name = "bn_scale"

    def scores(self, deps: DependencyGraph, gm: torch.fx.GraphModule) -> Scores:
        weights = norm_weights(gm)
        state, fallback, out = _state(gm), L1().scores(deps, gm), {}
        for g in deps.prunable_groups:
            gammas = [m for m in g.members if m.role == "param" and m.name in weights]
            out[g.id] = _lp_sums(deps, state, gammas, 1)[g.atoms] if gammas else fallback[g.id]
        return out
