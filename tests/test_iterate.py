"""prune_iteratively, coarse ranking, keep_classes and the History it returns."""

from __future__ import annotations

import math

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from conftest import FORWARDS, Net, quadrant_data, same_state, state_copy
from torch import nn

import fxprune
from fxprune.errors import ArgumentError
from fxprune.selection.stats import ClassSubset



X, Y = quadrant_data(256)
TRAIN = [(X[i:i + 32], Y[i:i + 32]) for i in range(0, 192, 32)]
CALIBRATION = TRAIN[:2]
TEST = (X[192:], Y[192:])
EXAMPLE = X[:1]


class Finetune:
    """A real fine-tune: SGD over the training batches; records the widths of the model it was given."""

    def __init__(self, epochs: int = 2) -> None:
        self.epochs, self.calls, self.inside = epochs, [], False

    def __call__(self, model: nn.Module) -> None:
        self.calls.append(sum(p.numel() for p in model.parameters()))
        self.inside = True
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for _ in range(self.epochs):
            for xb, yb in TRAIN:
                opt.zero_grad()
                F.cross_entropy(model(xb), yb).backward()
                opt.step()
        self.inside = False


def accuracy(model: nn.Module) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(TEST[0]).argmax(1) == TEST[1]).float().mean())


def trained_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net()
    Finetune(epochs=3)(net)
    return net.eval()


def test_prune_iteratively_prunes_in_steps_and_fine_tunes(tmp_path):
    net = trained_net()
    before = state_copy(net)
    start = fxprune.count_flops(net, EXAMPLE) / 1e9
    finetune = Finetune()
    pruned, history = fxprune.prune_iteratively(
        net, target_gflops=start * 0.4, steps=3, finetune=finetune, evaluate=accuracy, selector="l1", example_inputs=EXAMPLE, progress=False
    )
    assert same_state(net, before)
    assert [s.step for s in history.steps] == [0, 1, 2, 3]
    gflops = [s.gflops for s in history.steps]
    assert gflops[0] == pytest.approx(start)
    assert all(a > b for a, b in zip(gflops, gflops[1:]))
    # each step's target is an equal slice of the way; the budget lands at or just under it
    for k, g in enumerate(gflops[1:], 1):
        assert start - k * (start - 0.4 * start) / 3 >= g >= 0.9 * (start - k * 0.6 * start / 3)
    assert gflops[-1] == pytest.approx(fxprune.count_flops(pruned, EXAMPLE) / 1e9)
    assert history.steps[-1].params == sum(p.numel() for p in pruned.parameters())
    # finetune got the model of each step, narrower every time, and trained it in place
    assert finetune.calls == [s.params for s in history.steps[1:]]
    assert history.steps[0].metric == accuracy(net) > 0.6
    assert history.steps[-1].metric == accuracy(pruned) > 0.5
    assert all(s.finetuning_s > 0 and s.rewriting_s > 0 for s in history.steps[1:])
    assert "fine-tuning s" in str(history) and history.table("github").startswith("|   step |")
    assert pruned.meta["fxprune"]["history"]["steps"][3]["gflops"] == gflops[3]
    # one report for all three steps: from the model as given to the result
    rep = fxprune.report(pruned)
    assert [f / 1e9 for f in rep.flops] == pytest.approx([gflops[0], gflops[-1]])
    assert rep.params == (history.steps[0].params, history.steps[-1].params)
    stem = next(r for r in rep.rows if r.name == "stem.0")
    assert stem.out_channels == (16, pruned.get_submodule("stem.0").out_channels) and stem.out_channels[1] < 16
    assert not any("fxprune_tap" in n for n, _ in pruned.named_modules())
    png = history.plot(tmp_path / "history.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_seed_same_result():
    net = trained_net()
    runs = [
        fxprune.prune_iteratively(net, ratio=0.5, steps=2, finetune=lambda m: None, selector="random", example_inputs=EXAMPLE, seed=3, progress=False)[0]
        for _ in range(2)
    ]
    assert runs[0].meta["fxprune"]["plan"] == runs[1].meta["fxprune"]["plan"]
    other = fxprune.prune_iteratively(net, ratio=0.5, steps=2, finetune=lambda m: None, selector="random", example_inputs=EXAMPLE, seed=4, progress=False)[0]
    assert other.meta["fxprune"]["plan"] != runs[0].meta["fxprune"]["plan"]


@pytest.mark.parametrize("selector", ["taylor", "apoz"])
def test_coarse_ranking_adds_no_forward_passes(selector):
    """Every forward on data (batch > 1) is fine-tuning's own or a ranking pass over calibration=:
    coarse ranking runs that pass for step 1 only (nothing was fine-tuned yet), separate ranking every step."""
    net = trained_net()
    kwargs = {"loss_fn": F.cross_entropy} if selector == "taylor" else {}
    counted = {}
    for coarse in (True, False):
        FORWARDS.clear()
        _, history = fxprune.prune_iteratively(
            net, ratio=0.6, steps=3, finetune=Finetune(epochs=1), selector=selector, example_inputs=EXAMPLE,
            calibration=CALIBRATION, coarse=coarse, progress=False, **kwargs,
        )
        counted[coarse] = [b for b in FORWARDS if b > 1]  # batch 1: shape propagation and verification
        assert history.coarse == coarse
    ranking_batches = [xb.shape[0] for xb, _ in CALIBRATION]
    fine_tuning = [xb.shape[0] for xb, _ in TRAIN] * 3
    # FORWARDS holds every data forward: fine-tuning's own plus ranking passes
    assert sorted(counted[True]) == sorted(fine_tuning + ranking_batches)
    assert sorted(counted[False]) == sorted(fine_tuning + ranking_batches * 3)


def test_coarse_ranking_uses_the_fine_tuning_statistics():
    """With coarse ranking, steps after the first rank by what the taps saw during fine-tuning: a
    fine-tune that never runs a training forward leaves nothing to rank by."""
    net = trained_net()
    with pytest.raises(ArgumentError, match="coarse ranking saw no training forward pass"):
        fxprune.prune_iteratively(
            net, ratio=0.5, steps=2, finetune=lambda m: None, selector="apoz", example_inputs=EXAMPLE,
            calibration=CALIBRATION, progress=False,
        )
    pruned, history = fxprune.prune_iteratively(
        net, ratio=0.5, steps=2, finetune=lambda m: None, selector="apoz", example_inputs=EXAMPLE,
        calibration=CALIBRATION, coarse=False, progress=False,
    )
    assert history.steps[2].ranking_s > 0


def test_finetune_gets_taps_only_with_coarse_ranking():
    seen = []
    net = trained_net()
    for selector, kwargs in (("taylor", {"calibration": CALIBRATION, "loss_fn": F.cross_entropy}), ("l1", {})):
        fxprune.prune_iteratively(
            net, ratio=0.4, steps=2, finetune=lambda m: (seen.append(sum("fxprune_tap" in n for n, _ in m.named_modules())), Finetune(1)(m)),
            selector=selector, example_inputs=EXAMPLE, progress=False, **kwargs,
        )
    assert seen[0] > 0 and seen[1] == 0  # the last step's fine-tuning feeds no ranking
    assert seen[2:] == [0, 0]


def test_keep_only_classes_equals_the_original_logits():
    net = trained_net()
    before = state_copy(net)
    small = fxprune.keep_only_classes(net, [1, 3], EXAMPLE)
    assert same_state(net, before)
    assert small.head.out_features == 2 and small.meta["fxprune"]["classes"] == [1, 3]
    # Same numbers up to float rounding, not bitwise: a head with 2 rows instead of 4 is another GEMM,
    # which may take another kernel and sum in another order (1.2e-7 apart seen); assert_close's float32
    # defaults (rtol 1.3e-6, atol 1e-5) allow that and nothing a wrong row would cause.
    with torch.no_grad():
        torch.testing.assert_close(small(TEST[0]), net(TEST[0])[:, [1, 3]])
    # compile with nothing else removed (ratio 0) gives the same model
    same = fxprune.compile(net, ratio=0.0, example_inputs=EXAMPLE, keep_classes=[1, 3])
    with torch.no_grad():
        torch.testing.assert_close(same(TEST[0]), net(TEST[0])[:, [1, 3]])


def test_keep_only_classes_for_a_segmentation_head():
    head = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 1)).eval()
    x = torch.randn(2, 3, 10, 10)
    small = fxprune.keep_only_classes(head, [0, 2, 5], x)
    with torch.no_grad():
        torch.testing.assert_close(small(x), head(x)[:, [0, 2, 5]])  # float rounding only: 3 output channels, not 6


@pytest.mark.parametrize(
    "keep,match",
    [([3, 1], "must be sorted"), ([0, 4], r"in 0\.\.3"), ([], "at least one"), ([1, 1], "distinct")],
)
def test_keep_classes_errors(keep, match):
    with pytest.raises(ArgumentError, match=match):
        fxprune.keep_only_classes(Net().eval(), keep, EXAMPLE)


def test_keep_classes_needs_one_logits_tensor():
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x):
            return self.a(x), self.b(x)

    with pytest.raises(ArgumentError, match="one tensor with the classes along dim 1"):
        fxprune.keep_only_classes(TwoHeads(), [0], torch.randn(1, 4))


def test_class_subset_keeps_kept_classes_and_renumbers():
    batches = list(ClassSubset([(X[:64], Y[:64])], [1, 3]))
    (inputs,), target = batches[0]
    chosen = (Y[:64] == 1) | (Y[:64] == 3)
    assert torch.equal(inputs, X[:64][chosen])
    assert torch.equal(target, (Y[:64][chosen] == 3).long())
    with pytest.raises(ArgumentError, match="no class target"):
        list(ClassSubset([X[:4]], [0]))


def test_prune_iteratively_with_keep_classes():
    """Class-specific gradual pruning: the fine-tune sees two outputs and renumbered targets; ranking
    data is only the kept classes' samples."""
    net = trained_net()
    keep = [0, 2]
    seen_outputs = []
    calibration_seen = []

    def finetune(model):
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for xb, yb in TRAIN:
            chosen = (yb == 0) | (yb == 2)
            out = model(xb[chosen])
            seen_outputs.append(out.shape[1])
            opt.zero_grad()
            F.cross_entropy(out, (yb[chosen] == 2).long()).backward()
            opt.step()

    def loss(output, target):
        calibration_seen.append(target.clone())
        return F.cross_entropy(output, target)

    pruned, history = fxprune.prune_iteratively(
        net, ratio=0.5, steps=2, finetune=finetune, selector="taylor", calibration=CALIBRATION, loss_fn=loss,
        example_inputs=EXAMPLE, keep_classes=keep, progress=False,
    )
    assert set(seen_outputs) == {2}
    assert pruned.head.out_features == 2 and pruned.meta["fxprune"]["classes"] == keep
    assert calibration_seen and all(set(t.tolist()) <= {0, 1} for t in calibration_seen)
    n_kept = sum(int(((yb == 0) | (yb == 2)).sum()) for _, yb in CALIBRATION)
    assert sum(t.numel() for t in calibration_seen) == n_kept
    assert history.steps[0].gflops < fxprune.count_flops(net, EXAMPLE) / 1e9  # step 0 is the 2-class model
    rep = fxprune.report(pruned)  # ... but the report starts from the model as given, all 4 classes
    assert next(r for r in rep.rows if r.name == "head").out_channels == (4, 2)
    assert rep.flops[0] == fxprune.count_flops(net, EXAMPLE)
    assert history.steps[-1].gflops <= 0.5 * history.steps[0].gflops * (1 + 1e-9)


def test_prune_iteratively_argument_errors():
    net = Net().eval()
    with pytest.raises(ArgumentError, match="steps must be a positive integer"):
        fxprune.prune_iteratively(net, ratio=0.5, steps=0, finetune=lambda m: None, example_inputs=EXAMPLE)
    with pytest.raises(ArgumentError, match="exactly one of"):
        fxprune.prune_iteratively(net, steps=2, finetune=lambda m: None, example_inputs=EXAMPLE)
    with pytest.raises(ArgumentError, match="above the model"):
        fxprune.prune_iteratively(net, target_gflops=1e3, steps=2, finetune=lambda m: None, example_inputs=EXAMPLE)
    with pytest.raises(ArgumentError, match="finetune must be a function"):
        fxprune.prune_iteratively(net, ratio=0.5, steps=2, finetune=None, example_inputs=EXAMPLE)
    assert math.isfinite(fxprune.count_flops(net, EXAMPLE))


def test_bn_taylor_coarse_ranking_adds_no_forward_or_backward_pass():
    """bn_taylor under coarse ranking reads the gradients of the norm scales that fine-tuning computes:
    every data forward (and so every backward) is fine-tuning's own; step 1 ranks by |gamma|."""
    net = trained_net()
    FORWARDS.clear()
    pruned, history = fxprune.prune_iteratively(
        net, ratio=0.6, steps=3, finetune=Finetune(epochs=1), selector="bn_taylor", example_inputs=EXAMPLE, progress=False,
    )
    assert sorted(b for b in FORWARDS if b > 1) == sorted([xb.shape[0] for xb, _ in TRAIN] * 3)
    assert history.coarse and fxprune.count_flops(pruned, EXAMPLE) <= 0.4 * fxprune.count_flops(net, EXAMPLE)
    assert all(not p._post_accumulate_grad_hooks for p in pruned.parameters())  # the hooks are gone


def test_bn_taylor_tap_is_the_mean_gamma_times_gradient():
    from fxprune import pipeline
    from fxprune.selection import normgrad

    a = pipeline.analyze(trained_net(), EXAMPLE)
    weights = ["stem.1.weight", "res.1.weight", "res.4.weight"]
    gm = a.gm.train()
    tapped = normgrad.GradTap(a.deps, gm, weights)
    expected = {w: torch.zeros(gm.get_parameter(w).numel(), dtype=torch.float64) for w in weights}
    for xb, yb in TRAIN[:3]:
        gm.zero_grad()
        F.cross_entropy(gm(xb), yb).backward()
        for w in weights:
            p = gm.get_parameter(w)
            expected[w] += (p.detach() * p.grad).abs().double() / 3
    torch.testing.assert_close(tapped.atom_scores(), normgrad.atom_sums(a.deps, expected))
    assert tapped.seconds >= 0 and all(not gm.get_parameter(w)._post_accumulate_grad_hooks for w in weights)


def test_bn_taylor_in_compile_takes_a_pass_and_leaves_the_model_alone():
    net = trained_net()
    net.zero_grad(set_to_none=True)
    state = state_copy(net)
    pruned = fxprune.compile(net, ratio=0.4, example_inputs=EXAMPLE, selector="bn_taylor", calibration=CALIBRATION, loss_fn=F.cross_entropy)
    assert same_state(net, state) and all(p.grad is None for p in net.parameters())
    assert fxprune.count_flops(pruned, EXAMPLE) <= 0.6 * fxprune.count_flops(net, EXAMPLE)
    with pytest.raises(ArgumentError, match="bn_taylor"):
        fxprune.compile(net, ratio=0.4, example_inputs=EXAMPLE, selector="bn_taylor")
    with pytest.raises(ArgumentError, match="both calibration= and loss_fn="):
        fxprune.compile(net, ratio=0.4, example_inputs=EXAMPLE, selector="bn_taylor", calibration=CALIBRATION)
