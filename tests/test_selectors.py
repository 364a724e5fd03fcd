"""Selectors and the budget modes on tiny hand-built models whose right answer is known.

Models are small chains of convs: the last conv's outputs are the model's and stay, so each chain has
one prunable group per inner conv. Weights, BatchNorm parameters and calibration data are set so that
each selector has one obvious choice.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fxprune
from fxprune import pipeline
from conftest import X16, same_state, state_copy, two_groups, width
from fxprune.core.flops import FlopModel
from fxprune.core.widths import WidthRule

X = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
_gen = torch.Generator().manual_seed(2)
CAL = [torch.randn(4, 3, 8, 8, generator=_gen) for _ in range(3)]
TARGETS = [torch.randn(4, 4, 8, 8, generator=_gen) for _ in range(3)]


def mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(output, target)


def one_group(bn: bool = True, relu: bool = True) -> nn.Sequential:
    """conv0 (3 -> 8, no bias) [-> bn] [-> relu] -> conv (8 -> 4): one prunable group of width 8, conv0's
    outputs. Every MAC scales with its kept width, so ratio=k/8 removes exactly k channels."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, padding=1, bias=False)]
    layers += [nn.BatchNorm2d(8)] if bn else []
    layers += [nn.ReLU()] if relu else []
    return nn.Sequential(*layers, nn.Conv2d(8, 4, 1)).eval()




def kept(pruned: torch.fx.GraphModule, param: str = "0.weight") -> list[int]:
    return pruned.meta["fxprune"]["kept"]["parameters"][param]["0"]


def removed(pruned: torch.fx.GraphModule, full: nn.Module) -> int:
    return sum(m.out_channels for m in full if isinstance(m, nn.Conv2d)) - sum(
        m.out_channels for m in pruned.modules() if isinstance(m, nn.Conv2d)
    )


# ------------------------------------------------------------------ weight-based selectors
def test_l1_and_l2_rank_filters_by_their_norm() -> None:
    model = one_group(bn=False)
    w = torch.zeros(8, 27)
    for c in range(8):
        if c % 2 == 0:
            w[c] = 0.1 * (1 + c / 100)  # spread out: L1 about 2.7, L2 about 0.52
        else:
            w[c, 0] = 1.5 * (1 + c / 100)  # one large weight: L1 = L2 = about 1.5
    with torch.no_grad():
        model[0].weight.copy_(w.view(8, 3, 3, 3))
    assert kept(fxprune.compile(model, ratio=0.5, example_inputs=X, selector="l1")) == [0, 2, 4, 6]
    assert kept(fxprune.compile(model, ratio=0.5, example_inputs=X, selector="l2")) == [1, 3, 5, 7]


def test_bn_scale_keeps_the_largest_gammas_and_falls_back_to_l1() -> None:
    model = one_group()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.1, -5.0, 0.2, 3.0, 0.05, -4.0, 0.3, 2.0]))
    assert kept(fxprune.compile(model, ratio=0.5, example_inputs=X, selector="bn_scale")) == [1, 3, 5, 7]
    plain = one_group(bn=False)  # no norm layer: l1's choice
    by_scale = fxprune.compile(plain, ratio=0.5, example_inputs=X, selector="bn_scale")
    assert kept(by_scale) == kept(fxprune.compile(plain, ratio=0.5, example_inputs=X, selector="l1"))


def test_random_is_seeded_and_leaves_the_callers_generator_alone() -> None:
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 4, 1)).eval()

    def plan(seed: int) -> list[int]:
        return kept(fxprune.compile(model, ratio=0.5, example_inputs=X, selector="random", seed=seed))

    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    first = plan(0)
    assert torch.equal(torch.rand(3), expected)
    assert plan(0) == first and len(first) == 16
    assert len({tuple(first), tuple(plan(1)), tuple(plan(2))}) == 3
    assert first != list(range(16))


# ------------------------------------------------------------------ gflops_aware and the FLOP model
class DepthwiseResidual(nn.Module):
    """stem -> depthwise -> pointwise (8 -> 8, reads and writes the same atoms) + stem -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.mid = nn.Conv2d(8, 6, 1)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y = self.stem(x)
        return self.head(F.relu(self.mid(F.relu(self.pw(self.dw(y))) + y)))


def test_saved_per_atom_is_the_macs_one_removal_saves() -> None:
    graph = fxprune.analyze(DepthwiseResidual().eval(), X)
    model = FlopModel(graph, 0)
    none = torch.zeros(graph.num_atoms, dtype=torch.bool)
    expected = []
    for a in range(graph.num_atoms):
        one = none.clone()
        one[a] = True
        expected.append(model.macs(none) - model.macs(one))
    torch.testing.assert_close(model.saved_per_atom(), torch.tensor(expected, dtype=torch.float64))


def test_gflops_aware_shrinks_the_most_expensive_group_first_and_fastest() -> None:
    model = two_groups()
    total = 256 * (16 * 75 + 16 * 16 + 16 * 4)
    assert fxprune.count_flops(model, X16) == 2 * total
    pruned = fxprune.compile(model, ratio=0.4, example_inputs=X16, selector="gflops_aware", round_to=1)
    # Group A's channels save 23296 MACs each, group B's 5120: A shrinks at twice the mean rate (the cap),
    # B at half of it, each from its last position, neither down to one channel.
    a, b = width(pruned, "0"), width(pruned, "2")
    assert 1 < a < b < 16
    assert kept(pruned) == list(range(a))
    assert fxprune.count_flops(pruned, X16) <= 0.6 * 2 * total
    uniform = fxprune.compile(model, ratio=0.4, example_inputs=X16, round_to=1)
    assert removed(pruned, model) < removed(uniform, model)


# ------------------------------------------------------------------ budget modes and width rules
def test_global_mode_ranks_groups_together_after_normalizing_each() -> None:
    model = two_groups()
    with torch.no_grad():
        scale = 1 + torch.arange(16.0) / 100
        model[0].weight.mul_(0.01 * scale.view(16, 1, 1, 1) / model[0].weight.abs().sum((1, 2, 3), keepdim=True))
        model[0].weight[0].mul_(1000)  # A: one strong channel, the rest 1000x weaker than it
        model[2].weight.mul_(scale.view(16, 1, 1, 1) / model[2].weight.abs().sum((1, 2, 3), keepdim=True))  # B: all alike
    per_group = fxprune.compile(model, ratio=0.3, example_inputs=X16, selector="l1")
    assert width(per_group, "0") < 16 and width(per_group, "2") < 16
    global_ = fxprune.compile(model, ratio=0.3, example_inputs=X16, selector="l1", mode="global")
    assert width(global_, "2") == 16 and 0 in kept(global_) and width(global_, "0") < 16
    # Scores are divided by their group's largest: scaling a group's weights changes nothing.
    with torch.no_grad():
        model[0].weight.mul_(1000)
    again = fxprune.compile(model, ratio=0.3, example_inputs=X16, selector="l1", mode="global")
    assert again.meta["fxprune"]["plan"] == global_.meta["fxprune"]["plan"]


@pytest.mark.parametrize("mode", ["per_group", "global"])
def test_min_width_is_a_floor(mode: str) -> None:
    model = two_groups()
    pruned = fxprune.compile(model, ratio=0.65, example_inputs=X16, selector="l1", mode=mode, min_width=6)
    assert width(pruned, "0") >= 6 and width(pruned, "2") >= 6
    with pytest.raises(fxprune.TargetUnreachableError, match="min_width=6"):
        fxprune.compile(model, ratio=0.7, example_inputs=X16, selector="l1", mode=mode, min_width=6)


def test_gflops_aware_stops_at_the_floor_then_moves_on() -> None:
    pruned = fxprune.compile(two_groups(), ratio=0.65, example_inputs=X16, selector="gflops_aware", min_width=6)
    assert width(pruned, "0") == 6 and width(pruned, "2") < 16


def test_width_rule() -> None:
    rule = WidthRule(min_width=3, round_to=8)
    assert [rule.kept(24, n) for n in (0, 3, 4, 5, 8, 10, 24)] == [24, 24, 24, 16, 16, 16, 8]  # nearest; a tie keeps more
    assert [rule.more(24, k) for k in (8, 16, 20)] == [16, 24, 24]
    assert [rule.kept(6, n) for n in (0, 2, 6)] == [6, 4, 4]  # not wider than round_to: multiples of 4
    assert [WidthRule(round_to=16).kept(16, n) for n in (3, 5, 12)] == [16, 8, 8] and WidthRule(round_to=8).kept(3, 2) == 2
    assert WidthRule(min_width=9, round_to=8).kept(24, 24) == 16
    assert WidthRule(min_width=30).kept(24, 24) == 24
    # an atom that is a block of 13 channels: 13 * kept must be a multiple of 8
    assert [rule.kept(8, n, 13) for n in (0, 4, 8)] == [8, 8, 8] and WidthRule(round_to=2).kept(8, 4, 13) == 4
    assert WidthRule(round_to=8).kept(8, 5, 2) == 4  # 2 channels per atom: multiples of 4 atoms
    # an atom that repeats (a position in each group) counts once: per-group widths of 8, or all of them
    assert [rule.kept(8, n, 26, repeated=True) for n in (0, 4, 6)] == [8, 8, 8]
    assert [rule.kept(24, n, 13, repeated=True) for n in (4, 10, 20)] == [24, 16, 8]


def test_round_to_applies_to_the_width_per_group_of_a_grouped_conv() -> None:
    """The kernels run at the width per group: 8 per group stay whole at round_to=8, also for 26 groups,
    where 4 per group would make 104 channels, a multiple of 8, and run barely faster than 8; the budget
    goes to the other groups."""
    for groups in (13, 26):
        c = 8 * groups
        model = nn.Sequential(nn.Conv2d(3, c, 1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1, groups=groups), nn.ReLU(),
                              nn.Conv2d(c, 64, 1), nn.ReLU(), nn.Conv2d(64, 10, 1)).eval()
        pruned = fxprune.compile(model, ratio=0.4, example_inputs=X16, round_to=8)
        assert width(pruned, "0") == c and width(pruned, "2") == c
        assert width(pruned, "4") % 8 == 0 and width(pruned, "4") < 64
        assert fxprune.count_flops(pruned, X16) <= 0.6 * fxprune.count_flops(model, X16)
        finer = fxprune.compile(model, ratio=0.4, example_inputs=X16, round_to=2)
        assert width(finer, "2") % (2 * groups) == 0 and width(finer, "2") < c  # an even width per group
    assert width(fxprune.compile(model, ratio=0.4, example_inputs=X16, round_to=4), "2") % 104 == 0  # 4 or 8 per group


@pytest.mark.parametrize("mode", ["per_group", "global"])
@pytest.mark.parametrize("ratio", [0.3, 0.6])
def test_round_to_keeps_multiples_and_meets_the_target(mode: str, ratio: float) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 6, 1), nn.ReLU(), nn.Conv2d(6, 4, 1),
    ).eval()
    pruned = fxprune.compile(model, ratio=ratio, example_inputs=X16, selector="l1", mode=mode, round_to=8)
    assert width(pruned, "0") % 8 == 0 and width(pruned, "2") % 8 == 0
    assert removed(pruned, model) > 0
    assert fxprune.count_flops(pruned, X16) <= (1 - ratio) * fxprune.count_flops(model, X16)


# ------------------------------------------------------------------ data-driven selectors
def activation_model() -> nn.Sequential:
    """one_group() where channel 2 is always negative before the ReLU (but has the largest filter),
    channel 3 is scaled to ~0, channel 6 to ~1e-3, and the next conv ignores channel 5."""
    model = one_group()
    with torch.no_grad():
        model[0].weight[2].mul_(10)
        model[1].bias[2] = -100.0
        model[1].weight[3] = 1e-6
        model[1].weight[6] = 1e-3
        model[1].bias[[3, 6]] = 0.0
        model[3].weight[:, 5] = 0.0
    return model


def removed_channels(pruned: torch.fx.GraphModule) -> set[int]:
    return set(range(8)) - set(kept(pruned))


def test_apoz_removes_the_channel_that_is_always_zero() -> None:
    model = activation_model()
    pruned = fxprune.compile(model, ratio=1 / 8, example_inputs=X, selector="apoz", calibration=CAL)
    assert removed_channels(pruned) == {2}
    assert 2 in kept(fxprune.compile(model, ratio=1 / 8, example_inputs=X, selector="l1"))


def test_mean_activation_removes_the_weakest_channels() -> None:
    pruned = fxprune.compile(activation_model(), ratio=3 / 8, example_inputs=X, selector="mean_activation", calibration=CAL)
    assert removed_channels(pruned) == {2, 3, 6}  # 5 stays: it is active, whatever the next conv does with it


def test_mean_activation_without_activations_uses_every_node() -> None:
    model = one_group(bn=False, relu=False)
    with torch.no_grad():
        model[0].weight[1].mul_(1e-3)
    pruned = fxprune.compile(model, ratio=1 / 8, example_inputs=X, selector="mean_activation", calibration=CAL)
    assert removed_channels(pruned) == {1}


def test_taylor_removes_channels_that_do_not_move_the_loss() -> None:
    data = list(zip(CAL, TARGETS))
    pruned = fxprune.compile(activation_model(), ratio=3 / 8, example_inputs=X, selector="taylor", calibration=data, loss_fn=mse)
    assert removed_channels(pruned) == {2, 3, 5}  # 5 is active, but the next conv ignores it
    frozen = activation_model().requires_grad_(False)  # works without gradients on the user's weights
    again = fxprune.compile(frozen, ratio=3 / 8, example_inputs=X, selector="taylor", calibration=data, loss_fn=mse)
    assert kept(again) == kept(pruned)


def test_wanda_removes_channels_that_are_zero_or_that_no_weight_reads() -> None:
    pruned = fxprune.compile(activation_model(), ratio=3 / 8, example_inputs=X, selector="wanda", calibration=CAL)
    assert removed_channels(pruned) == {2, 3, 5}  # 2 is never positive, 3 is ~0, 5 is ignored by the next conv


def test_wanda_scores_are_the_reading_weights_times_their_input_rms() -> None:
    """Each hidden unit of a two-layer MLP scores sum_i |W2[i, j]| * rms(relu(h)_j) over the calibration data
    (float32 activations summed in float64: relative tolerance 1e-5, and 1e-8 absolute for scores of 0)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    data = [torch.randn(5, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    a = pipeline.analyze(model, data[0][:1])
    (group,) = a.deps.prunable_groups
    scores = fxprune.SELECTORS["wanda"](data).scores(a.deps, a.gm)[group.id]
    with torch.no_grad():
        rms = torch.cat([model[1](model[0](x)) for x in data]).double().square().mean(0).sqrt()
    expected = model[2].weight.detach().double().abs().sum(0) * rms
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-8)


def test_wanda_reads_every_group_of_a_grouped_conv_weight() -> None:
    """A grouped conv holds one group's inputs per weight: each input channel's column is taken in its own
    group, and an atom (channel j with channel j + 4, which the groups tie) sums its two channels."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1, groups=2)).eval()
    a = pipeline.analyze(model, X)
    (group,) = a.deps.prunable_groups
    scores = fxprune.SELECTORS["wanda"](CAL).scores(a.deps, a.gm)[group.id]
    with torch.no_grad():
        rms = torch.cat([model[0](x) for x in CAL]).double().square().mean((0, 2, 3)).sqrt()
    w = model[1].weight.detach().double().abs()  # (4, 4, 1, 1): outputs 0-1 read inputs 0-3, outputs 2-3 read 4-7
    per_channel = torch.cat([w[:2].sum((0, 2, 3)), w[2:].sum((0, 2, 3))]) * rms
    torch.testing.assert_close(scores, per_channel[:4] + per_channel[4:], rtol=1e-5, atol=1e-8)


def test_calibration_forms_agree() -> None:
    model = activation_model()
    x = torch.cat(CAL)
    forms = [CAL, [(c,) for c in CAL], [(c, None) for c in CAL], DataLoader(TensorDataset(x), batch_size=4), x]
    plans = [kept(fxprune.compile(model, ratio=2 / 8, example_inputs=X, selector="mean_activation", calibration=f)) for f in forms]
    assert all(p == plans[0] for p in plans)


def test_calibration_never_touches_the_users_model() -> None:
    model = activation_model().train()  # a forward in train mode would update BatchNorm statistics
    state = state_copy(model)
    loader = DataLoader(TensorDataset(torch.cat(CAL), torch.cat(TARGETS)), batch_size=4)
    fxprune.compile(model, ratio=0.25, example_inputs=X, selector="apoz", calibration=loader)
    fxprune.compile(model, ratio=0.25, example_inputs=X, selector="taylor", calibration=loader, loss_fn=mse)
    assert same_state(model, state)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert all(m.training for m in model.modules())


# ------------------------------------------------------------------ custom selectors and errors
class Constant:
    """Every atom of the i-th group scores 5 - i; ``comparable`` says whether that compares across groups."""

    def __init__(self, comparable: bool) -> None:
        self.comparable_across_groups = comparable

    def scores(self, graph, gm):
        return {g.id: torch.full((g.width,), 5.0 - i) for i, g in enumerate(graph.prunable_groups)}


def test_custom_selectors_and_their_scale() -> None:
    model = two_groups()
    comparable = fxprune.compile(model, ratio=0.1, example_inputs=X16, selector=Constant(True))  # global: B scores lower
    assert width(comparable, "0") == 16 and width(comparable, "2") < 16
    per_group = fxprune.compile(model, ratio=0.1, example_inputs=X16, selector=Constant(False))
    assert width(per_group, "0") < 16 and width(per_group, "2") < 16
    normalized = fxprune.compile(model, ratio=0.1, example_inputs=X16, selector=Constant(False), mode="global")
    assert width(normalized, "0") < 16  # after normalization both groups score 1: A (group order) goes first


class WrongLength:
    def scores(self, graph, gm):
        return {g.id: torch.zeros(g.width + 1) for g in graph.prunable_groups}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"selector": "apoz"}, "needs? calibration=|pass calibration="),
        ({"selector": "taylor", "calibration": CAL}, "pass loss_fn="),
        ({"selector": "apoz", "calibration": CAL, "loss_fn": mse}, "only used by selector 'taylor'"),
        ({"selector": "l1", "calibration": CAL}, "'l1' does not read it"),
        ({"mode": "best"}, "unknown mode 'best'"),
        ({"min_width": 0}, "min_width must be an integer >= 1"),
        ({"round_to": 2.5}, "round_to must be an integer >= 1"),
        ({"selector": "gflops_aware", "mode": "per_group"}, "mode='global'"),
        ({"selector": "apoz", "calibration": []}, "no batches"),
        ({"selector": "apoz", "calibration": [{"x": X}]}, "calibration batch 0 is a dict"),
        ({"selector": "apoz", "calibration": [torch.randn(2, 5, 8, 8)]}, "calibration batch 0: running the model"),
        ({"selector": "taylor", "calibration": CAL, "loss_fn": lambda out, target: out}, "scalar tensor"),
        ({"selector": WrongLength()}, "8 finite numbers"),
    ],
)
def test_bad_selector_arguments_get_clear_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(fxprune.ArgumentError, match=match):
        fxprune.compile(one_group(), ratio=0.5, example_inputs=X, **kwargs)


def test_equal_widths_keeps_repeated_layers_at_one_width() -> None:
    """Three identical residual blocks: at ratio 0.2 the budget's last steps would leave one block wider;
    with equal_widths the blocks get their channels back together."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(16, 40), nn.Linear(40, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.fc2(torch.relu(self.fc1(x)))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.layers, self.out = nn.Linear(8, 16), nn.Sequential(*[Block() for _ in range(3)]), nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.layers(self.inp(x)))

    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 8)

    def widths(equal: bool) -> list[int]:
        pruned = fxprune.compile(model, example_inputs=x, ratio=0.2, round_to=1, equal_widths=equal)
        return [pruned.get_parameter(f"layers.{i}.fc1.weight").shape[0] for i in range(3)]

    assert len(set(widths(False))) > 1
    equal = widths(True)
    assert len(set(equal)) == 1 and equal[0] < 40
    with pytest.raises(fxprune.ArgumentError, match="per_group"):
        fxprune.compile(model, example_inputs=x, ratio=0.2, equal_widths=True, mode="global")


def test_weight_taylor_sums_weight_times_gradient_over_each_atoms_parameters() -> None:
    """Linear(4, 6) -> ReLU -> Linear(6, 2): a hidden channel's score is the mean over batches of
    |w * dL/dw| summed over its row and bias entry in the first layer and its column in the second."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(5, 4, generator=gen), torch.randint(0, 2, (5,), generator=gen)) for _ in range(3)]
    a = pipeline.analyze(model, data[0][0][:1])
    (group,) = a.deps.prunable_groups
    scores = fxprune.SELECTORS["weight_taylor"](data, F.cross_entropy).scores(a.deps, a.gm)[group.id]
    expected = torch.zeros(6, dtype=torch.float64)
    for x, y in data:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        first, second = model[0], model[2]
        expected += ((first.weight * first.weight.grad).abs().sum(1) + (first.bias * first.bias.grad).abs()
                     + (second.weight * second.weight.grad).abs().sum(0)).double()
    torch.testing.assert_close(scores, expected / len(data), rtol=1e-5, atol=1e-9)
    model.zero_grad()
