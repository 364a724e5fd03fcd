"""Selectors: which atoms of each group matter most.

A selector has one job: score every atom of every prunable group (higher = keep). How many atoms each
group loses is decided once, by the budget logic in ``selection/budget.py``, never by a selector. Any object
with a ``scores(graph, gm)`` method of the same signature can be passed as ``selector=``; one whose scores
are comparable across groups as they are (not only within a group) sets ``comparable_across_groups =
True``, and is then ranked globally without normalization. One that sets ``uses_width_rule = True`` is
called as ``scores(graph, gm, rule=...)`` with the ``WidthRule`` the plan's widths will follow; one that
sets ``uses_cost = True`` also gets ``cost=``, the cost model the target is counted in (the latency model
for a latency target, the FLOP model otherwise), and one with a ``rank(graph, gm, importance, rule, cost)``
method turns per-atom importance (the statistics coarse ranking gathers) into its scores.

``gm`` is the captured GraphModule: it shares its tensors with the user's model, so a selector must not
modify them. Data-driven selectors (``apoz``, ``mean_activation``, ``taylor``, ``wanda``) run on calibration data
through ``selection.stats``, which never touches them. The selectors themselves live in ``weights``
(data-free), ``costaware`` (ranked by cost), ``knapsack`` (importance per cost) and ``datadriven``; ``SELECTORS`` names them all.
"""

from __future__ import annotations

from typing import Any

from ..errors import ArgumentError
from .costaware import GflopsAware, LatencyAware, LatencyPerFlop
from .datadriven import APoZ, BNTaylor, MeanActivation, Taylor, Wanda, WeightTaylor
from .knapsack import Knapsack, KnapsackBNTaylor
from .protocol import Selector
from .stats import LossFn
from .weights import BNScale, L1, L2, Random, Uniform

__all__ = ["SELECTORS", "get_selector", "data_driven", "takes_loss", "selector_name"]

SELECTORS: dict[str, type] = {cls.name: cls for cls in (Uniform, Random, L1, L2, BNScale, GflopsAware, LatencyAware, LatencyPerFlop,
                                                         Knapsack, APoZ, MeanActivation, Taylor, WeightTaylor, Wanda, BNTaylor, KnapsackBNTaylor)}
"""Every selector by its ``name`` (each class says its own): the one list that the docs, the command line
and the errors read."""


def get_selector(selector: str | Selector, calibration: Any = None, loss_fn: LossFn | None = None) -> Selector:
    """The selector named ``selector`` (data-driven ones get ``calibration``/``loss_fn``), or the object itself."""
    if isinstance(selector, str):
        if selector not in SELECTORS:
            raise ArgumentError(f"unknown selector {selector!r}; choose one of {sorted(SELECTORS)} or pass an object with a scores(graph, gm) method")
        cls = SELECTORS[selector]
        if getattr(cls, "takes_data", False):
            return cls(calibration, loss_fn)
        selector = cls()
    elif not isinstance(selector, Selector):
        raise ArgumentError(f"selector {selector!r} has no scores(graph, gm) method")
    if calibration is not None or loss_fn is not None:
        given = "calibration=" if calibration is not None else "loss_fn="
        raise ArgumentError(
            f"{given} is only used by the data-driven selectors {', '.join(map(repr, data_driven()))}; "
            f"selector {selector_name(selector)!r} does not read it (a selector object takes its data itself)"
        )
    return selector


def data_driven() -> list[str]:
    """Names of the selectors that read calibration data."""
    return [name for name, cls in SELECTORS.items() if getattr(cls, "takes_data", False)]


def takes_loss(name: str) -> bool:
    """Whether the selector ``name`` takes ``loss_fn=`` (ranks by gradients of a loss)."""
    return bool(getattr(SELECTORS.get(name), "takes_loss", False))


def selector_name(selector: Any) -> str:
    """A selector's ``name``, or its class name for a user's object without one."""
    return getattr(selector, "name", type(selector).__name__)
