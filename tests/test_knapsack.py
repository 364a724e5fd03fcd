"""The knapsack selectors: the most importance kept for the cost, across groups."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fxprune
from conftest import X16, FlopClock, quadrant_data, two_groups, width
from fxprune import pipeline
from fxprune.core.widths import WidthRule
from fxprune.selection.budget import select
from fxprune.selection.knapsack import Knapsack

X32 = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


class PerChannelMs:
    """A fake latency model: each kept channel of a group costs that group's milliseconds."""

    def __init__(self, graph, ms: dict[int, float]) -> None:
        self.groups, self.ms = {g.id: g for g in graph.prunable_groups}, ms

    def cost(self, removed: torch.Tensor) -> float:
        return sum(ms * int((~removed[self.groups[gid].atoms]).sum()) for gid, ms in self.ms.items())

    def describe(self, value: float) -> str:
        return f"{value:g} ms"

    def reached(self, smallest: float) -> dict:
        return {}


def two_group_analysis() -> tuple[pipeline.Analysis, int, int]:
    """two_groups() analyzed, and the ids of its groups A (conv0's outputs) and B (conv2's outputs)."""
    a = pipeline.analyze(two_groups(), X16)
    first = {g.members[0].name.split(".")[0]: g.id for g in a.deps.prunable_groups}
    return a, first["0"], first["2"]


def test_the_same_milliseconds_keep_the_more_important_channel() -> None:
    a, ga, gb = two_group_analysis()
    cost = PerChannelMs(a.deps, {ga: 1.0, gb: 1.0})
    # after each group's normalization, A's first 15 channels weigh 1/sqrt(24) and B's all 1/sqrt(16)
    importance = {ga: torch.tensor([1.0] * 15 + [3.0]), gb: torch.ones(16)}
    scores = Knapsack().rank(a.deps, a.gm, importance, cost=cost)
    assert float(scores[ga][:12].max()) < float(scores[gb].min())  # A's ones go first, down to a quarter of A
    plan = select(a.deps, cost, cost.cost(torch.zeros(a.deps.num_atoms, dtype=torch.bool)) - 4, scores, mode="global", comparable=True)
    assert len(plan.keep[ga]) == 12 and gb not in plan.keep and 15 in plan.keep[ga]


def test_the_same_importance_keeps_the_cheaper_channel() -> None:
    a, ga, gb = two_group_analysis()
    cost = PerChannelMs(a.deps, {ga: 2.0, gb: 1.0})
    scores = Knapsack().rank(a.deps, a.gm, {ga: torch.ones(16), gb: torch.ones(16)}, cost=cost)
    assert float(scores[ga].min()) < float(scores[gb].min())
    plan = select(a.deps, cost, cost.cost(torch.zeros(a.deps.num_atoms, dtype=torch.bool)) - 4, scores, mode="global", comparable=True)
    assert len(plan.keep[ga]) == 14 and gb not in plan.keep  # two of A's 2 ms channels, not four of B's 1 ms ones


def test_without_a_cost_model_a_mac_is_the_cost() -> None:
    a, ga, gb = two_group_analysis()  # A costs 23296 MACs a channel, B 5120
    scores = Knapsack().rank(a.deps, a.gm, {ga: torch.ones(16), gb: torch.ones(16)})
    assert float(scores[ga].min()) < float(scores[gb].min())


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_knapsack_keeps_the_width_rule_empties_no_group_and_meets_a_flops_target(ratio: float) -> None:
    model = torchvision.models.resnet18(num_classes=10).eval()
    full = fxprune.count_flops(model, X32)
    pruned = fxprune.compile(model, ratio=ratio, example_inputs=X32, selector="knapsack", round_to=8, min_width=16)
    assert (1 - ratio - 0.03) * full <= fxprune.count_flops(pruned, X32) <= (1 - ratio) * full
    before = dict(model.named_modules())
    for name, m in pruned.named_modules():
        if isinstance(m, nn.Conv2d):
            assert m.out_channels == before[name].out_channels or (m.out_channels % 8 == 0 and m.out_channels >= 16), name


def test_knapsack_reaches_a_latency_target_on_the_latency_model(fake_clock: FlopClock) -> None:
    """On a clock where time is FLOPs, conv0's channels (4.5x the MACs of conv2's) go first."""
    pruned = fxprune.compile(two_groups(), speedup=1.5, example_inputs=X16, selector="knapsack", round_to=8)
    assert pruned.meta["fxprune"]["report"]["latency"]["speedup"] >= 1.5
    assert (width(pruned, "0"), width(pruned, "2")) == (8, 16)


def test_knapsack_bn_taylor_reads_calibration_and_coarse_ranking_takes_its_taps() -> None:
    x, y = quadrant_data(64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                          nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()
    calibration = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    pruned = fxprune.compile(model, ratio=0.5, example_inputs=x[:1], selector="knapsack_bn_taylor", calibration=calibration,
                             loss_fn=F.cross_entropy)
    assert fxprune.count_flops(pruned, x[:1]) <= 0.5 * fxprune.count_flops(model, x[:1])

    def finetune(m: nn.Module) -> None:
        opt = torch.optim.SGD(m.parameters(), lr=0.01)
        m.train()
        for i in range(0, 64, 16):
            opt.zero_grad()
            F.cross_entropy(m(x[i : i + 16]), y[i : i + 16]).backward()
            opt.step()

    result, history = fxprune.prune_iteratively(model, finetune=finetune, ratio=0.5, steps=2, example_inputs=x[:1], selector="knapsack_bn_taylor",
                                                coarse=True)
    assert history.coarse and fxprune.count_flops(result, x[:1]) <= 0.5 * fxprune.count_flops(model, x[:1])


def test_the_width_rule_sets_the_step() -> None:
    """At round_to=8 every greedy step of a 16-wide group is 8 channels: removals come in blocks of 8."""
    a, ga, gb = two_group_analysis()
    cost = PerChannelMs(a.deps, {ga: 1.0, gb: 1.0})
    scores = Knapsack().rank(a.deps, a.gm, {ga: torch.ones(16), gb: torch.ones(16)}, rule=WidthRule(round_to=8), cost=cost)
    first = torch.sort(scores[ga]).values
    assert int(first[:8].floor().unique().numel()) == 1  # the first 8 of A went in one round


def test_a_latency_target_with_data_defaults_to_bn_taylor(fake_clock: FlopClock) -> None:
    x, y = quadrant_data(32)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(16, 4)).eval()
    data = {"calibration": [(x, y)], "loss_fn": F.cross_entropy}
    with_data = fxprune.compile(model, speedup=1.2, example_inputs=x[:1], **data)
    assert with_data.meta["fxprune"]["strategy"]["selector"] == "bn_taylor"
    assert fxprune.compile(model, speedup=1.2, example_inputs=x[:1]).meta["fxprune"]["strategy"]["selector"] == "uniform"
    named = fxprune.compile(model, speedup=1.2, example_inputs=x[:1], selector="knapsack_bn_taylor", **data)
    assert named.meta["fxprune"]["strategy"]["selector"] == "knapsack_bn_taylor"
