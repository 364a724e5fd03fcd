"""Strategy: how channels are chosen (selector, budget mode, width rule, seed, calibration data).

One frozen dataclass is the single list of these options: ``compile`` and ``prune_iteratively`` take it
as ``strategy=`` (or its fields as keywords), the command line builds its flags from the fields marked
for it, and the torch.compile backend accepts the field names as options.
"""

from __future__ import annotations

import argparse
import difflib
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

import torch

from ..core.fxutil import is_hf
from ..errors import ArgumentError
from ..core.groups import DependencyGraph
from ..core.widths import WidthRule
from .budget import MODES, CostModel
from .protocol import Selector
from .selectors import SELECTORS, data_driven, get_selector, selector_name
from .stats import CALIBRATION_FORMS, LossFn

__all__ = ["Strategy", "Chooser"]

Mode = Literal["per_group", "global"]


def _cli(help: str, **argparse: Any) -> dict[str, Any]:
    """Field metadata for a field the command line offers as ``--NAME`` (argparse keywords included)."""
    return {"cli": {"help": help, **argparse}}


def _round_to(text: str) -> int | str:
    """``--round-to``'s value: ``auto`` or an integer."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or auto, got {text!r}") from None


@dataclass(frozen=True)
class Strategy:
    """How channels are chosen; see ``fxprune.compile`` for what each field means."""

    selector: str | Selector = field(default="uniform", metadata=_cli(
        f"{', '.join(n for n in SELECTORS if n not in data_driven())} (default: uniform), or with --calibration DIR "
        f"{', '.join(data_driven())}"))
    mode: Mode | None = field(default=None, metadata=_cli(
        "per_group: same fraction of every group (default); global: all channels ranked together", choices=MODES))
    min_width: int = field(default=1, metadata=_cli("every pruned group keeps at least N channels", type=int, metavar="N"))
    round_to: int | Literal["auto"] = field(default="auto", metadata=_cli(
        "kept widths are multiples of N (e.g. 8); auto (default): the multiple measured fastest on this device",
        type=_round_to, metavar="N|auto"))
    equal_widths: bool | None = field(default=None, metadata=_cli(
        "layers that repeat keep equal widths (default: for Hugging Face models, whose configs hold one size per model)",
        action="store_const", const=True))
    seed: int = field(default=0, metadata=_cli("seed of random selection and of the default example input", type=int))
    calibration: Any = None
    loss_fn: LossFn | None = None
    compensate: bool = field(default=False, metadata=_cli(
        "fold each removed channel's mean over the calibration data into the bias of the linear layers that read it", action="store_true"))

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in MODES:
            raise ArgumentError(f"unknown mode {self.mode!r}; choose 'per_group' (same fraction of every group) or 'global' (all channels ranked together)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ArgumentError(f"seed must be an integer, got {self.seed!r}")
        WidthRule(self.min_width, 1 if self.round_to == "auto" else self.round_to)  # validates both
        if self.compensate and self.calibration is None:
            raise ArgumentError("compensate=True folds the removed channels' means over calibration data into the next layers' biases: "
                                f"pass calibration= too, {CALIBRATION_FORMS}")
        if self.equal_widths and self.mode == "global":
            raise ArgumentError("equal_widths=True keeps repeated layers at equal widths, which needs mode='per_group'")

    @property
    def rule(self) -> WidthRule:
        """The width rule; ``round_to="auto"`` must first be measured (``pipeline.measure_round_to``)."""
        if self.round_to == "auto":
            raise ArgumentError("round_to='auto' becomes a number only on an analyzed model (pipeline.measure_round_to)")
        return WidthRule(self.min_width, self.round_to, bool(self.equal_widths))

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def of(cls, strategy: Strategy | None = None, **options: Any) -> Strategy:
        """``strategy`` (default: ``Strategy()``) with the fields named in ``options`` replaced."""
        if strategy is not None and not isinstance(strategy, Strategy):
            raise ArgumentError(f"strategy= must be an fxprune.Strategy, got {type(strategy).__name__}")
        names = cls.option_names()
        for name in options:
            if name not in names:
                close = difflib.get_close_matches(name, names, n=1)
                hint = f"; did you mean {close[0]}=?" if close else ""
                raise ArgumentError(f"unknown option {name}={options[name]!r}; the strategy options are {', '.join(names)}{hint}")
        return replace(strategy or cls(), **options)

    def for_model(self, model: Any) -> Strategy:
        """This strategy with ``equal_widths=None`` decided: True for a Hugging Face model under a per-group
        budget (its config holds one size per model, so only then does its class come back), else False."""
        if self.equal_widths is not None:
            return self
        return replace(self, equal_widths=is_hf(model) and self.chooser().mode == "per_group")

    def chooser(self) -> Chooser:
        """The selector object and the budget settings this strategy stands for."""
        sel = get_selector(self.selector, self.calibration, self.loss_fn)
        comparable = bool(getattr(sel, "comparable_across_groups", False))
        if comparable and (self.mode == "per_group" or self.equal_widths):
            raise ArgumentError(f"selector {selector_name(sel)!r} ranks channels of different groups against each other; it needs "
                                "mode='global' (its default), and so cannot keep equal widths (equal_widths=False)")
        return Chooser(self, sel, "global" if comparable else self.mode or "per_group", comparable)


@dataclass(frozen=True)
class Chooser:
    """Not a third concept but a ``Strategy`` resolved for one compile (``Strategy.chooser``): its selector
    name made the ``Selector`` object that scores atoms, its mode decided, and ``round_to="auto"`` made a
    number (``measured``). Users give a Strategy; a Selector only scores; the budget
    (``selection/budget.py``) turns scores into a plan."""

    strategy: Strategy
    selector: Selector
    mode: str
    comparable: bool
    measured: bool = False

    @property
    def rule(self) -> WidthRule:
        return self.strategy.rule

    def scores(self, deps: DependencyGraph, gm: torch.fx.GraphModule, seed: int, untapped: bool = False,
               cost: CostModel | None = None, tapped: dict[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
        """The selector's scores, with torch's global CPU generator seeded by ``seed`` and restored afterwards
        (the selectors draw on the CPU; ``torch.manual_seed`` would also seed every accelerator's generator,
        which ``fork_rng`` does not restore);
        ``untapped``: the first step of coarse ranking, before any fine-tuning was tapped; ``tapped``: the
        statistics coarse ranking gathered (the scores themselves, unless the selector ranks importance
        with ``rank``). A selector that sets ``uses_width_rule`` also gets the width rule (the latency ones
        time the widths it allows), one that sets ``uses_cost`` the ``cost`` model of the target."""
        extra = {"rule": self.rule} if getattr(self.selector, "uses_width_rule", False) else {}
        extra |= {"cost": cost} if getattr(self.selector, "uses_cost", False) else {}
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            if tapped is not None:
                rank = getattr(self.selector, "rank", None)
                return rank(deps, gm, tapped, **extra) if rank is not None else tapped
            return (self.selector.untapped_scores if untapped else self.selector.scores)(deps, gm, **extra)

    def describe(self) -> dict[str, Any]:
        """JSON-ready record of the strategy, kept in ``meta["fxprune"]["strategy"]``."""
        s = self.strategy
        out = {"selector": selector_name(self.selector), "mode": self.mode, "min_width": s.min_width,
               "round_to": s.round_to, "equal_widths": bool(s.equal_widths), "seed": s.seed}
        out |= {"compensate": True} if s.compensate else {}
        return {**out, "round_to_measured": True} if self.measured else out
