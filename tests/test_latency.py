"""Latency targets, the latency cost model and its cache, round_to="auto", the ranking-free selectors.

Timings here are fakes that follow the FLOPs (a module "takes" 1 ms per MFLOP plus 0.05 ms), so every
test checks behaviour, never the speed of this machine; benchmarks/latency.py measures for real.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fxprune
from fxprune import latency, pipeline, timing
from fxprune.timing import Latency, Setting, TimingCache, measure_in_turns

sys.path.insert(0, str(Path(__file__).parent))
from test_selectors import X16, two_groups, width  # noqa: E402

X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 64, 3, padding=1)
        self.b = nn.Conv2d(64, 96, 3, padding=1)
        self.c = nn.Conv2d(96, 64, 1)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        y = torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x))))))
        return self.head(y.mean((2, 3)))


def flop_ms(model: nn.Module, inputs) -> float:
    """What the fake clocks charge for one call: 1 ms per MFLOP, plus 0.05 ms."""
    return fxprune.count_flops(model, tuple(inputs)) / 1e6 + 0.05


def fake_measure(models, inputs, *, repeat=15, warmup=3, min_ms=5.0):
    """``measure_in_turns`` as if every MFLOP took 1 ms, plus 0.05 ms per call."""
    setting = Setting.of(models[0], tuple(inputs))
    return [Latency(ms, ms, ms, repeat, int(inputs[0].shape[0]), setting, ms, ms) for ms in (flop_ms(m, inputs) for m in models)]


class FlopClock:
    """``timing.time_calls`` as if every MFLOP took 1 ms, plus 0.05 ms per call; ``factor(model)`` can
    slow some timings down (a busy machine). A model's cost is computed once."""

    def __init__(self, factor=lambda model: 1.0) -> None:
        self.ms: dict[int, tuple[nn.Module, float]] = {}
        self.factor = factor

    def true_ms(self, model: nn.Module, inputs) -> float:
        if id(model) not in self.ms:
            self.ms[id(model)] = model, flop_ms(model, inputs)  # the model is kept, so its id stays its own
        return self.ms[id(model)][1]

    def __call__(self, model, inputs, calls, sync) -> float:
        return self.true_ms(model, inputs) * self.factor(model)


def layer_latency(layer: nn.Module, x: torch.Tensor) -> Latency:
    return fake_measure([layer], (x,))[0]


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> FlopClock:
    clock = FlopClock()
    monkeypatch.setattr(timing, "time_calls", clock)
    monkeypatch.setattr(latency, "layer_ms", layer_latency)
    return clock


def test_measure_latency_says_what_and_where() -> None:
    lat = fxprune.measure_latency(Net(), X, repeat=3, warmup=1)
    assert lat.median_ms > 0 and lat.q1_ms <= lat.median_ms <= lat.q3_ms and lat.runs == 3
    assert lat.batch == 1 and lat.setting.device == "cpu" and lat.setting.threads == torch.get_num_threads()
    assert lat.setting.dtype == "torch.float32" and lat.setting.torch == torch.__version__
    assert "ms median" in str(lat)


def test_measuring_leaves_the_model_in_its_mode() -> None:
    net = Net().train()
    measure_in_turns([net], (X,), repeat=1, warmup=0)
    assert all(m.training for m in net.modules())


def test_speedup_target_holds_as_measured_and_is_reported(fake_clock: FlopClock) -> None:
    net = Net().eval()
    pruned = fxprune.compile(net, speedup=2.0, example_inputs=X)
    record = pruned.meta["fxprune"]["report"]["latency"]
    assert record["speedup"] >= 2.0 and record["after_ms"] <= record["before_ms"] / 2
    assert record["batch"] == 1 and record["device"] == "cpu" and record["threads"] == torch.get_num_threads()
    summary = fxprune.report(pruned).summary()
    assert "latency" in summary and "faster" in summary and "batch 1" in summary
    table = str(fxprune.report(pruned))
    assert "est. ms" in table and set(record["layers_ms"]) == {"a", "b", "c", "head"}
    lo, hi = record["interval"]
    assert lo <= record["speedup"] <= hi and f"{lo:.3g}-{hi:.3g}x" in summary
    b_before, b_after = record["layers_ms"]["b"]
    assert b_after < b_before
    torch.testing.assert_close(fake_measure([pruned], (X,))[0].median_ms, record["after_ms"])


def test_target_latency_ms(fake_clock: FlopClock) -> None:
    net = Net().eval()
    goal = fake_measure([net], (X,))[0].median_ms * 0.6
    pruned = fxprune.compile(net, target_latency_ms=goal, example_inputs=X)
    assert fake_measure([pruned], (X,))[0].median_ms <= goal


def test_the_cache_is_used(fake_clock: FlopClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FXPRUNE_CACHE_DIR", str(tmp_path))
    net = Net().eval()
    first = fxprune.compile(net, speedup=1.5, example_inputs=X, verify=False)
    record = first.meta["fxprune"]["report"]["latency"]
    assert record["timings_taken"] > record["results_timed"] > 0
    second = fxprune.compile(net, speedup=1.5, example_inputs=X, verify=False)
    record = second.meta["fxprune"]["report"]["latency"]
    assert record["timings_taken"] == 0 and record["results_timed"] == 1  # the cached result, timed once more
    assert record["rechecked_speedup"] >= 1.5 and "when timed again now" in fxprune.report(second).summary()
    assert second.meta["fxprune"]["plan"] == first.meta["fxprune"]["plan"]
    (key, table), = json.loads((tmp_path / "latency.json").read_text()).items()
    assert f"{torch.get_num_threads()} threads" in key and "torch.float32" in key and torch.__version__ in key
    assert all(k.startswith(("Conv2d[1, ", "Linear[1, ", "BatchNorm2d[1, ", "model ")) for k in table)


def test_unreachable_speedup_names_the_best_reached(fake_clock: FlopClock) -> None:
    with pytest.raises(fxprune.TargetUnreachableError, match=r"best speed-up measured \(\d+ results timed\) was") as info:
        fxprune.compile(Net().eval(), speedup=1e5, example_inputs=X, verify=False)
    assert 1.0 < info.value.best_speedup < 1e5  # the fake clock charges 0.05 ms a call: at most ~2600x
    assert f"{info.value.best_speedup:.3g}x" in str(info.value)


@pytest.mark.parametrize("kwargs", [{"speedup": 0.5}, {"target_latency_ms": 0}, {"speedup": 2.0, "ratio": 0.5}])
def test_latency_target_arguments_are_checked(kwargs: dict) -> None:
    with pytest.raises(fxprune.ArgumentError):
        fxprune.compile(Net(), example_inputs=X, **kwargs)


def test_latency_model_answers_like_the_flop_model(fake_clock: FlopClock) -> None:
    """With times proportional to FLOPs, estimated milliseconds of a removal track its MACs."""
    a = pipeline.analyze(Net().eval(), X)
    model = latency.LatencyModel(a.graph, a.flops, a.gm, None, Setting.of(a.gm, a.inputs), TimingCache(), 1)
    none = torch.zeros(a.graph.num_atoms, dtype=torch.bool)
    for g in a.graph.prunable_groups:
        half = none.clone()
        half[g.atoms[g.width // 2:]] = True
        saved_ms = model.cost(none) - model.cost(half)
        saved_mflops = 2 * (a.flops.macs(none) - a.flops.macs(half)) / 1e6
        assert saved_ms == pytest.approx(saved_mflops, rel=0.15)


@pytest.mark.measured
@pytest.mark.parametrize("step,expected", [(8, 8), (16, 16), (1, 8)])
def test_round_to_auto_picks_the_fast_steps(monkeypatch: pytest.MonkeyPatch, step: int, expected: int) -> None:
    """A layer whose widths off multiples of ``step`` run 40% slower gets multiples of ``step``; flat timings
    (step 1) get 8, the least multiple "auto" takes."""

    def time(self, kept, setting, cache):
        w = kept[-1]
        return 0.01 * w * (1.0 if w % step == 0 else 1.4)

    monkeypatch.setattr(latency.Layer, "time", time)
    a = pipeline.analyze(Net().eval(), X)
    assert latency.fast_multiple(a.gm, a.graph, Setting.of(a.gm, a.inputs), TimingCache()) == expected
    pruned = fxprune.compile(Net().eval(), ratio=0.5, example_inputs=X, verify=False)
    assert pruned.meta["fxprune"]["strategy"]["round_to"] == expected
    assert pruned.meta["fxprune"]["strategy"]["round_to_measured"] is True
    assert all(len(keep) % expected == 0 for keep in pruned.meta["fxprune"]["plan"].values())


@pytest.mark.measured
def test_round_to_auto_wants_the_fast_steps_even_a_few_percent_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Widths off multiples of 8 run 5% slower: a few percent per layer is a few percent of the whole
    model, so "auto" takes 8 (within 2% of the best), not the finest multiple within 5%."""
    monkeypatch.setattr(latency.Layer, "time", lambda self, kept, setting, cache: 1.0 if kept[-1] % 8 == 0 else 1.05)
    a = pipeline.analyze(Net().eval(), X)
    assert latency.fast_multiple(a.gm, a.graph, Setting.of(a.gm, a.inputs), TimingCache()) == 8


@pytest.mark.measured
def test_round_to_auto_narrows_a_pruned_input_with_the_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pruned model narrows a layer's input channels with its outputs, so the widths are timed that way."""
    timed: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def time(self, kept, setting, cache):
        timed.append((self.sizes, kept))
        return 0.01 * kept[-1]

    monkeypatch.setattr(latency.Layer, "time", time)
    a = pipeline.analyze(Net().eval(), X)
    latency.fast_multiple(a.gm, a.graph, Setting.of(a.gm, a.inputs), TimingCache())
    assert {sizes for sizes, _ in timed} == {(64, 96), (96, 64)}  # b and c, the costliest; their inputs are pruned
    assert all(kept[0] == round(sizes[0] * kept[1] / sizes[1]) for sizes, kept in timed)


@pytest.mark.measured
def test_round_to_auto_does_not_time_a_dilated_conv(monkeypatch: pytest.MonkeyPatch) -> None:
    """A dilated conv (DeepLab's ASPP: the costliest layers there) runs another kernel whose time hardly
    steps with the width; it is not what the rest of the model runs, so the probe skips it."""
    timed: list[tuple[int, ...]] = []

    def time(self, kept, setting, cache):
        timed.append(self.sizes)
        return 0.01 * kept[-1]

    monkeypatch.setattr(latency.Layer, "time", time)
    model = Net().eval()
    model.b = nn.Conv2d(64, 96, 3, padding=2, dilation=2)
    a = pipeline.analyze(model, X)
    latency.fast_multiple(a.gm, a.graph, Setting.of(a.gm, a.inputs), TimingCache())
    assert set(timed) == {(96, 64), (3, 64)}  # c and a: b, the costliest, is dilated


def test_an_explicit_round_to_wins() -> None:
    pruned = fxprune.compile(Net().eval(), ratio=0.5, example_inputs=X, verify=False, round_to=4)
    assert pruned.meta["fxprune"]["strategy"]["round_to"] == 4 and "round_to_measured" not in pruned.meta["fxprune"]["strategy"]


@pytest.mark.parametrize("selector", ["gflops_aware", "latency_aware"])
def test_ranking_free_selectors_never_empty_a_group(fake_clock: FlopClock, selector: str) -> None:
    """two_groups: group A's channels cost 4.5x group B's. Both shrink, A faster, neither to min_width."""
    model = two_groups()
    for ratio in (0.4, 0.6, 0.8):
        pruned = fxprune.compile(model, ratio=ratio, example_inputs=X16, selector=selector, round_to=1)
        a, b = width(pruned, "0"), width(pruned, "2")
        assert 1 < a < b <= 16
        if ratio >= 0.6:
            assert b < 16


def slow_5x5(models, inputs, *, repeat=15, warmup=3, min_ms=5.0):
    """``fake_measure``, with 5x5 convs taking 5 ms per MFLOP: their channels cost the most time per MAC."""
    out = fake_measure(models, inputs, repeat=repeat, warmup=warmup, min_ms=min_ms)
    slow = [isinstance(m, nn.Conv2d) and m.kernel_size == (5, 5) for m in models]
    return [dataclasses.replace(t, median_ms=5 * t.median_ms, q1_ms=5 * t.q1_ms, q3_ms=5 * t.q3_ms, low_ms=5 * t.low_ms, high_ms=5 * t.high_ms) if s else t
            for t, s in zip(out, slow)]


def test_latency_per_flop_removes_the_slowest_channels_per_mac_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """two_groups with a slow 5x5 conv: group A (its outputs) saves 4.3x more ms per MAC than group B, so
    at 60% fewer FLOPs A alone shrinks (uniform would cut both to 10 of 16), and never below its quarter
    while B still has channels above its own."""
    monkeypatch.setattr(latency, "layer_ms", lambda layer, x: slow_5x5([layer], (x,))[0])
    model = two_groups()
    pruned = fxprune.compile(model, ratio=0.6, example_inputs=X16, selector="latency_per_flop", round_to=1)
    assert width(pruned, "0") in (4, 5, 6) and width(pruned, "2") == 16
    again = fxprune.compile(model, ratio=0.6, example_inputs=X16, selector="latency_per_flop", round_to=1)
    assert pruned.meta["fxprune"]["kept"] == again.meta["fxprune"]["kept"]
    deeper = fxprune.compile(model, ratio=0.75, example_inputs=X16, selector="latency_per_flop", round_to=1)
    assert width(deeper, "0") == 4 and width(deeper, "2") < 16


def test_latency_per_flop_never_empties_a_group(fake_clock: FlopClock) -> None:
    """With every layer at the same rate, group B (fewer MACs per channel for the same memory traffic)
    goes first, and past both groups' quarters both still keep channels (80% fewer FLOPs)."""
    model = two_groups()
    for ratio in (0.4, 0.6, 0.8):
        pruned = fxprune.compile(model, ratio=ratio, example_inputs=X16, selector="latency_per_flop", round_to=1)
        a, b = width(pruned, "0"), width(pruned, "2")
        assert 1 < min(a, b) and b < 16
        assert ratio == 0.8 or b < a


def test_shrink_order_is_capped_and_keeps_first_atoms_last() -> None:
    graph = fxprune.analyze(two_groups(), X16)
    ids = [g.id for g in graph.prunable_groups]
    scores = fxprune.selectors.shrink_order(graph, {ids[0]: 1000.0, ids[1]: 1.0})
    for gid in ids:
        assert bool((scores[gid][:-1] > scores[gid][1:]).all())  # the last position goes first
    # rates are capped at 2x the mean either way, so the ratio of removal times is at most 4
    first = [float(scores[gid][-1]) for gid in ids]
    assert first[1] / first[0] == pytest.approx(4.0, rel=0.01)
    assert math.isfinite(float(scores[ids[0]][0]))


@pytest.mark.parametrize("selector", ["latency_aware", "latency_per_flop"])
def test_latency_selectors_time_only_widths_the_rule_allows(monkeypatch: pytest.MonkeyPatch, selector: str) -> None:
    """Off the rule's multiple a layer can run far slower, and no plan keeps such a width: the cost model
    of the latency selectors times only full widths and multiples of ``round_to``."""
    timed: list[tuple[int, int]] = []

    def clock(layer: nn.Module, x: torch.Tensor) -> Latency:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            timed.append((layer.weight.shape[1] * getattr(layer, "groups", 1), layer.weight.shape[0]))
        return layer_latency(layer, x)

    monkeypatch.setattr(latency, "layer_ms", clock)
    fxprune.compile(Net().eval(), ratio=0.5, example_inputs=X, selector=selector, round_to=8, verify=False)
    full = {3, 64, 96, 10}
    assert timed and all(w in full or w % 8 == 0 for pair in timed for w in pair)
