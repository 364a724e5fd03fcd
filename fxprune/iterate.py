"""Gradual pruning: prune a slice, fine-tune, repeat until the FLOPs target; and its history.

Step k of ``steps`` prunes the current model to ``F0 - k * (F0 - target) / steps`` MACs (``F0``: the
starting model's), then calls the user's ``finetune(model)`` and ``evaluate(model)``. Each step selects
channels on the model the previous fine-tuning produced.

Coarse ranking (``coarse=True``, data-driven selectors): the statistics a step ranks by come from taps
(the selector's ``tap``) in the model handed to the previous step's ``finetune``, i.e. from the user's own
training forwards and backwards. The activation selectors insert identity modules after the probed nodes
(``fxprune.selection.stats.tap``); bn_taylor only hooks the gradients of the norm scales (``fxprune.selection.normgrad``).
Step 1, which has no fine-tuning before it, ranks as the selector's ``untapped_scores`` says: a pass
over ``calibration=`` (bn_taylor without data: ``|gamma|``). With ``coarse=False`` every step ranks in
such a pass. The time the taps take is counted as the next step's ranking time, not as fine-tuning time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx
from tabulate import tabulate
from torch import nn
from tqdm.auto import tqdm

from .core import metakeys as keys
from . import pipeline, targets
from .api import report
from .errors import ArgumentError
from .core.flops import total_macs
from .pipeline import Inputs, Model
from .selection.strategy import Strategy

__all__ = ["prune_iteratively", "History", "Step"]


@dataclass
class Step:
    """One row of a History; step 0 is the starting model (no time spent)."""

    step: int
    gflops: float
    params: int
    metric: float | None
    ranking_s: float = 0.0
    selecting_s: float = 0.0
    rewriting_s: float = 0.0
    finetuning_s: float = 0.0


@dataclass
class History:
    """What ``prune_iteratively`` did, step by step; prints as a table, saves as a plot."""

    steps: list[Step] = field(default_factory=list)
    selector: str = ""
    coarse: bool = False

    @property
    def ranking_s(self) -> float:
        return sum(s.ranking_s for s in self.steps)

    @property
    def pruning_s(self) -> float:
        """Total seconds: ranking, selecting, rewriting and fine-tuning over all steps."""
        return sum(s.ranking_s + s.selecting_s + s.rewriting_s + s.finetuning_s for s in self.steps)

    def table(self, fmt: str = "simple") -> str:
        headers = ["step", "GFLOPs", "params", "metric", "ranking s", "selecting s", "rewriting s", "fine-tuning s"]
        rows = [
            [s.step, f"{s.gflops:.4g}", s.params, "" if s.metric is None else f"{s.metric:.4g}",
             f"{s.ranking_s:.3f}", f"{s.selecting_s:.3f}", f"{s.rewriting_s:.3f}", f"{s.finetuning_s:.2f}"]
            for s in self.steps
        ]
        return tabulate(rows, headers=headers, tablefmt=fmt)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        return {"selector": self.selector, "coarse": self.coarse, "steps": [asdict(s) for s in self.steps]}

    def plot(self, path: str | Path) -> Path:
        """Metric against GFLOPs, one point per step, as an image (``pip install 'fxprune[plot]'``)."""
        from .render.draw import draw_history

        return draw_history(self, path)


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def prune_iteratively(
    model: Model,
    *,
    target_gflops: float | None = None,
    steps: int,
    finetune: Callable[[torch.fx.GraphModule], Any],
    evaluate: Callable[[torch.fx.GraphModule], float] | None = None,
    ratio: float | None = None,
    example_inputs: Inputs = None,
    strategy: Strategy | None = None,
    coarse: bool = True,
    keep_classes: Sequence[int] | None = None,
    ignore: Iterable[str] = (),
    verify: bool = True,
    progress: bool = True,
    **options: Any,
) -> tuple[torch.fx.GraphModule, History]:
    """Prune ``model`` to ``target_gflops`` (or by ``ratio`` of its FLOPs) in ``steps`` equal FLOPs slices,
    calling ``finetune(model)`` after each; return the final GraphModule and the History.

    ``finetune`` must train the module it is given in place (any torch.optim optimizer does; wrapping it
    in DistributedDataParallel is fine); ``evaluate(model) -> float`` fills the history's metric column
    (step 0: the starting model). The other arguments, the strategy and its fields as keywords, are
    ``compile``'s; step k selects with seed ``seed + k``. ``coarse`` (data-driven selectors only): rank
    from the statistics that taps gather during fine-tuning, see the module docstring; the module
    ``finetune`` gets then has identity tap modules named ``fxprune_tap_*``. ``evaluate`` and the result
    never have taps. With ``keep_classes``, step 0 restricts the model's outputs to those classes
    (``keep_only_classes``): ``finetune`` and ``evaluate`` see outputs numbered 0..len(keep_classes)-1.
    The result's ``meta["fxprune"]`` has the report of the whole procedure (its "before" is ``model`` as
    given), the last step's plan, and the history as a dict.
    """
    latency = [k for k in options if k in targets.Target.keywords(measured=True)]
    if latency:
        raise ArgumentError(f"{latency[0]}= is a latency target, which prune_iteratively does not take: it prunes in equal FLOPs steps "
                            f"({' or '.join(f'{k}=' for k in targets.Target.keywords(measured=False))}); measure the result with "
                            f"fxprune.measure_latency, or reach a latency target in one step with fxprune.compile({latency[0]}=...)")
    target = targets.Target.of(target_gflops=target_gflops, ratio=ratio)
    if not isinstance(steps, int) or steps < 1:
        raise ArgumentError(f"steps must be a positive integer, got {steps!r}")
    if not callable(finetune):
        raise ArgumentError("finetune must be a function finetune(model) that trains the model in place")
    chosen = Strategy.of(strategy, **options).for_model(model)
    job = pipeline.restrict_classes_first(model, example_inputs, chosen, keep_classes, verify)
    seed = chosen.seed
    a = pipeline.analyze(job.model, job.inputs, ignore, seed)
    start = a.flops.total
    goal = target.macs(start)
    if goal > start:
        raise ArgumentError(f"target_gflops={target_gflops} is above the model's {2 * start / 1e9:.4g} GFLOPs")
    measured = targets.measure_round_to(a, job.chooser, timed=False)
    job.chooser = chooser = targets.multiple_reaching(a, measured, goal)
    fallback = targets.fallback_note(measured, chooser, target.describe())
    tapping = coarse and hasattr(chooser.selector, "tap")
    name = chooser.describe()["selector"]
    history = History([Step(0, 2 * start / 1e9, _params(a.model), evaluate(a.model) if evaluate else None)], name, tapping)
    taps, done = None, None  # done: the report of every step so far
    bar = tqdm(range(1, steps + 1), desc=f"fxprune {name}", unit="step", disable=not progress)
    for k in bar:
        t0 = time.perf_counter() - (taps.seconds if taps is not None else 0.0)
        tapped = None
        if taps is not None:
            per_atom = taps.atom_scores()
            tapped = {g.id: per_atom[g.atoms] for g in a.deps.prunable_groups}
        scores = chooser.scores(a.deps, a.gm, seed + k, untapped=tapping, cost=a.flops, tapped=tapped)
        t1 = time.perf_counter()
        plan = pipeline.select_plan(a, chooser, start - k * (start - goal) / steps, scores)
        t2 = time.perf_counter()
        pruned = pipeline.build_result(a, plan, verify)
        done = report(pruned) if done is None else done.then(report(pruned))
        a = pipeline.analyze(pruned, a.inputs, ignore, seed)
        model = a.model
        model.meta = {**getattr(model, "meta", {}), keys.RECORD: pruned.meta[keys.RECORD]}
        t3 = time.perf_counter()
        taps = chooser.selector.tap(a.deps, a.gm) if tapping and k < steps else None
        finetune(model if taps is None else taps.module)
        t4 = time.perf_counter() - (taps.seconds if taps is not None else 0.0)
        metric = evaluate(model) if evaluate else None
        history.steps.append(Step(k, 2 * total_macs(a.gm) / 1e9, _params(model), metric, t1 - t0, t2 - t1, t3 - t2, t4 - t3))
        bar.set_postfix(gflops=f"{history.steps[-1].gflops:.3g}", metric="-" if metric is None else f"{metric:.4g}")
    a.model.meta[keys.RECORD]["history"] = history.to_dict()
    done.notes.extend([fallback] if fallback else [])
    return pipeline.fill_record(job, a.model, done, {"steps": steps, "coarse": tapping}), history
