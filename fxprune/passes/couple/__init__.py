"""couple: shape-annotated GraphModule -> DependencyGraph, by label propagation.

Every channel a producer creates gets an integer label (``labels``); an interpreter (``driver``) runs
the graph on labels instead of tensors, with one rule per op family:

* element-wise and channel-wise ops, softmax, reductions (``rules``);
* contracting ops: conv, linear, matmul, einsum (``contract``); attention heads (``attention``);
* statistics over channels: LayerNorm, GroupNorm (``norms``);
* shape ops, run on the label tensor itself (``layout``), and those whose literal sizes, split
  sections or slices must follow pruning (``literals``);
* anything else: every label it touches is frozen, and the reason is kept.

What the rules learn is kept in a ``State``; ``grouping`` turns it into the DependencyGraph.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.fx
from torch import nn

from ...core import metakeys as keys
from ...core.groups import DependencyGraph
from .driver import Coupler, RuleError
from .grouping import finalize
from .state import State, Unsupported

__all__ = ["couple", "Unsupported", "RuleError"]


def couple(gm: torch.fx.GraphModule, ignore: Iterable[str] = (), free_output: bool = False,
           modules: dict[str, nn.Module] | None = None) -> DependencyGraph:
    """Build the DependencyGraph of a GraphModule annotated by the shapes pass.

    The model's outputs keep all their channels unless ``free_output`` (used only to drop classes).
    ``modules``: ``modules_of(gm)`` when the caller has it.
    """
    state = State(gm, free_output, modules)
    with torch.no_grad():
        Coupler(gm, state, ignore).run(initial_env=state.env, enable_io_processing=False)
    return finalize(state, tuple(gm.meta.get(keys.OPAQUE, ())))
