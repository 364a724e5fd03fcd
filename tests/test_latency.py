"""Latency targets, the latency cost model and its cache, round_to="auto", the ranking-free selectors.

Timings here are fakes that follow the FLOPs (a module "takes" 1 ms per MFLOP plus 0.05 ms), so every
test checks behaviour, never the speed of this machine; benchmarks/latency.py measures for real.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import random
import re
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import fxprune
from fxprune import pipeline, targets
from fxprune.latency import costmodel, intervals, machine, multiple, timing
from conftest import X16, FlopClock, fake_measure, flop_ms, layer_latency, two_groups, width
from fxprune.latency.cache import TimingCache
from fxprune.latency.timing import Latency, Setting, measure_in_turns

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
    assert record["cached_speedup"] >= 1.5 and record["speedup"] >= 1.5 and "timed again now" in fxprune.report(second).summary()
    assert second.meta["fxprune"]["plan"] == first.meta["fxprune"]["plan"]
    (key, table), = json.loads((tmp_path / "latency.json").read_text()).items()
    assert f"{torch.get_num_threads()} threads" in key and "torch.float32" in key and torch.__version__ in key
    assert all(k.startswith(("Conv2d[1, ", "Linear[1, ", "BatchNorm2d[1, ", "model ", "round_to=auto Conv2d[1, ")) for k in table)


def test_unreachable_speedup_names_the_best_reached(fake_clock: FlopClock) -> None:
    with pytest.raises(fxprune.TargetUnreachableError, match=r"best speed-up measured \(\d+ results timed\) was") as info:
        fxprune.compile(Net().eval(), speedup=1e5, example_inputs=X, verify=False)
    assert 1.0 < info.value.best_speedup <= flop_ms(Net().eval(), (X,)) / 0.05  # the fake clock charges at least 0.05 ms a call
    assert f"{info.value.best_speedup:.3g}x" in str(info.value)


@pytest.mark.parametrize("kwargs", [{"speedup": 0.5}, {"target_latency_ms": 0}, {"speedup": 2.0, "ratio": 0.5}])
def test_latency_target_arguments_are_checked(kwargs: dict) -> None:
    with pytest.raises(fxprune.ArgumentError):
        fxprune.compile(Net(), example_inputs=X, **kwargs)


def test_latency_model_answers_like_the_flop_model(fake_clock: FlopClock) -> None:
    """With times proportional to FLOPs, estimated milliseconds of a removal track its MACs."""
    a = pipeline.analyze(Net().eval(), X)
    model = costmodel.LatencyModel(a.deps, a.flops, a.gm, None, Setting.of(a.gm, a.inputs), TimingCache(), 1)
    none = torch.zeros(a.deps.num_atoms, dtype=torch.bool)
    for g in a.deps.prunable_groups:
        half = none.clone()
        half[g.atoms[g.width // 2:]] = True
        saved_ms = model.cost(none) - model.cost(half)
        saved_mflops = 2 * (a.flops.macs(none) - a.flops.macs(half)) / 1e6
        assert saved_ms == pytest.approx(saved_mflops, rel=0.15)


def stepped_time(step: int):
    """``Layer.time`` for a layer whose widths off multiples of ``step`` run 40% slower."""
    return lambda self, kept, setting, cache: 0.01 * kept[-1] * (1.0 if kept[-1] % step == 0 else 1.4)


@pytest.mark.parametrize("step,expected", [(8, 8), (16, 16), (1, 8)])
def test_round_to_auto_picks_the_fast_steps_for_a_latency_target(monkeypatch: pytest.MonkeyPatch, step: int, expected: int) -> None:
    """A layer whose widths off multiples of ``step`` run 40% slower gets multiples of ``step`` under a
    latency target; flat timings (step 1) get 8, the least multiple "auto" takes. A FLOPs target gets 8."""
    monkeypatch.setattr(costmodel.Layer, "time", stepped_time(step))
    a = pipeline.analyze(Net().eval(), X)
    chooser = fxprune.Strategy().chooser()
    timed = targets.measure_round_to(a, chooser, timed=True)
    assert timed.strategy.round_to == expected and timed.describe()["round_to_measured"] is True
    assert targets.measure_round_to(a, chooser, timed=False).strategy.round_to == 8


def test_a_flops_target_gives_the_same_plan_whatever_the_clock_says(monkeypatch: pytest.MonkeyPatch) -> None:
    """round_to="auto" under a FLOPs target reads no clock: layers that run fast at multiples of 16 (a
    machine, or a moment of load, where 16 wins) and at multiples of 8 give one plan, of multiples of 8."""
    plans = []
    for step in (16, 8, 1):
        monkeypatch.setattr(costmodel.Layer, "time", stepped_time(step))
        monkeypatch.setattr(timing, "time_calls", FlopClock(lambda model: random.uniform(1, 3)))
        pruned = fxprune.compile(Net().eval(), ratio=0.5, example_inputs=X, verify=False)
        plans.append(pruned.meta["fxprune"]["plan"])
    assert plans[0] == plans[1] == plans[2]
    assert all(len(keep) % 8 == 0 for keep in plans[0].values())


@pytest.mark.measured
def test_round_to_auto_on_this_machines_clock() -> None:
    """On the real clock, whatever this machine's steps: the measured multiple is one "auto" offers, and
    a FLOPs target is reached at multiples of 8."""
    a = pipeline.analyze(Net().eval(), X)
    assert multiple.fast_multiple(a.gm, a.deps, Setting.of(a.gm, a.inputs), TimingCache()) in multiple.MULTIPLES
    pruned = fxprune.compile(Net().eval(), ratio=0.5, example_inputs=X)
    flops = fxprune.report(pruned).flops
    assert 0.47 <= 1 - flops[1] / flops[0] and flops[1] <= flops[0] / 2
    assert all(len(keep) % 8 == 0 for keep in pruned.meta["fxprune"]["plan"].values())


def test_round_to_auto_wants_the_fast_steps_even_a_few_percent_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Widths off multiples of 8 run 5% slower: a few percent per layer is a few percent of the whole
    model, so "auto" takes 8 (within 2% of the best), not the finest multiple within 5%."""
    monkeypatch.setattr(costmodel.Layer, "time", lambda self, kept, setting, cache: 1.0 if kept[-1] % 8 == 0 else 1.05)
    a = pipeline.analyze(Net().eval(), X)
    assert multiple.fast_multiple(a.gm, a.deps, Setting.of(a.gm, a.inputs), TimingCache()) == 8


def test_round_to_auto_is_decided_once_per_setting_even_on_a_noisy_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compile on a machine found noisy keeps none of its timings, but keeps the multiple it decided: a warm
    compile takes it without timing a layer (and so cannot decide otherwise and miss the result its cold compile
    remembered); on another setting (thread count, device, dtype, torch) it is decided again."""
    a = pipeline.analyze(Net().eval(), X)
    setting = Setting.of(a.gm, a.inputs)
    held = TimingCache(tmp_path / "latency.json")
    held.hold()
    decided = multiple.fast_multiple(a.gm, a.deps, setting, held)
    held.save()
    timed: list[tuple[int, ...]] = []
    monkeypatch.setattr(costmodel.Layer, "time", lambda self, kept, setting, cache: timed.append(kept) or 1.0)
    assert multiple.fast_multiple(a.gm, a.deps, setting, TimingCache(tmp_path / "latency.json")) == decided and not timed
    multiple.fast_multiple(a.gm, a.deps, dataclasses.replace(setting, threads=setting.threads + 1), TimingCache(tmp_path / "latency.json"))
    assert timed


def test_round_to_auto_narrows_a_pruned_input_with_the_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pruned model narrows a layer's input channels with its outputs, so the widths are timed that way."""
    timed: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def time(self, kept, setting, cache):
        timed.append((self.sizes, kept))
        return 0.01 * kept[-1]

    monkeypatch.setattr(costmodel.Layer, "time", time)
    a = pipeline.analyze(Net().eval(), X)
    multiple.fast_multiple(a.gm, a.deps, Setting.of(a.gm, a.inputs), TimingCache())
    assert {sizes for sizes, _ in timed} == {(64, 96), (96, 64)}  # b and c, the costliest; their inputs are pruned
    assert all(kept[0] == round(sizes[0] * kept[1] / sizes[1]) for sizes, kept in timed)


def test_round_to_auto_does_not_time_a_dilated_conv(monkeypatch: pytest.MonkeyPatch) -> None:
    """A dilated conv (DeepLab's ASPP: the costliest layers there) runs another kernel whose time hardly
    steps with the width; it is not what the rest of the model runs, so the probe skips it."""
    timed: list[tuple[int, ...]] = []

    def time(self, kept, setting, cache):
        timed.append(self.sizes)
        return 0.01 * kept[-1]

    monkeypatch.setattr(costmodel.Layer, "time", time)
    model = Net().eval()
    model.b = nn.Conv2d(64, 96, 3, padding=2, dilation=2)
    a = pipeline.analyze(model, X)
    multiple.fast_multiple(a.gm, a.deps, Setting.of(a.gm, a.inputs), TimingCache())
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
    monkeypatch.setattr(costmodel, "layer_ms", lambda layer, x: slow_5x5([layer], (x,))[0])
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
    scores = fxprune.selection.costaware.shrink_order(graph, {ids[0]: 1000.0, ids[1]: 1.0})
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

    monkeypatch.setattr(costmodel, "layer_ms", clock)
    fxprune.compile(Net().eval(), ratio=0.5, example_inputs=X, selector=selector, round_to=8, verify=False)
    full = {3, 64, 96, 10}
    assert timed and all(w in full or w % 8 == 0 for pair in timed for w in pair)


class Bursts:
    """Other work on the machine, in bursts: the timings of the model timed first (the original) are
    slowed 2-3x while a burst lasts; bursts start on a share of timings and last 1-4 timings. Seeded."""

    def __init__(self, share: float, seed: int) -> None:
        self.rng, self.share, self.left, self.first = random.Random(seed), share, 0, None

    def __call__(self, model: nn.Module) -> float:
        self.first = model if self.first is None else self.first
        if model is not self.first:
            return 1.0
        if self.left == 0 and self.rng.random() < self.share / 2.5:
            self.left = self.rng.randint(1, 4)
        if self.left:
            self.left -= 1
            return self.rng.uniform(2.0, 3.0)
        return 1.0


@pytest.mark.parametrize("share", [0.2, 0.5, 0.8])
@pytest.mark.parametrize("seed", range(3))
def test_bursts_that_slow_the_original_never_make_a_false_claim(monkeypatch: pytest.MonkeyPatch, share: float, seed: int) -> None:
    """Whatever share of the original's timings a burst slows 2-3x, a result is returned only when its
    true speed-up (the clock's charge without bursts) meets the target; otherwise compile refuses, and
    only because of the noise. Light bursts are seen through: a result comes back."""
    clock = FlopClock(Bursts(share, seed))
    monkeypatch.setattr(timing, "time_calls", clock)
    monkeypatch.setattr(costmodel, "layer_ms", layer_latency)
    net = Net().eval()
    try:
        pruned = fxprune.compile(net, speedup=2.0, example_inputs=X, verify=False, cache=False)
    except fxprune.MeasurementError as exc:
        assert share > 0.2, f"light bursts refused: {exc}"
        assert exc.noise is not None and "noisy" in str(exc)
        return
    record = pruned.meta["fxprune"]["report"]["latency"]
    truth = flop_ms(net, (X,)) / flop_ms(pruned, (X,))
    assert truth >= 2.0 and record["interval"][0] >= 2.0


def test_a_machine_too_noisy_to_decide_raises_or_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every other timing, at random, takes 10x as long: the machine check refuses before anything else is
    timed (round_to="auto"'s layer timings included, which a later compile would otherwise reuse), saying
    what it measured; with on_noise="warn" the search runs anyway and its result says how sure it is."""
    def noisy_clock() -> None:
        rng = random.Random(0)
        monkeypatch.setattr(timing, "time_calls", FlopClock(lambda model: rng.choice((1.0, 10.0))))

    monkeypatch.setattr(costmodel, "layer_ms", layer_latency)
    timed: list[nn.Module] = []
    monkeypatch.setattr(costmodel, "layer_ms", lambda layer, x: timed.append(layer) or layer_latency(layer, x))
    noisy_clock()
    with pytest.raises(fxprune.MeasurementError, match=r"cannot be decided .*too noisy .*A/A pairs varied by \d\d+\.\d%") as info:
        fxprune.compile(Net().eval(), speedup=1.5, example_inputs=X, verify=False, cache=False)
    assert not timed  # refused before any layer was timed
    assert info.value.noise > 0.10
    noisy_clock()
    with pytest.warns(UserWarning, match=r"cannot be decided .* Searching anyway"):
        pruned = fxprune.compile(Net().eval(), speedup=1.5, example_inputs=X, verify=False, cache=False, on_noise="warn")
    record = pruned.meta["fxprune"]["report"]["latency"]
    assert record["interval"][0] <= record["speedup"] <= record["interval"][1]


def test_each_timed_stage_says_before_it_starts_what_it_times_and_about_how_long(monkeypatch: pytest.MonkeyPatch,
                                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A latency compile announces its machine check (at least nine rounds of three forwards: a model whose
    forward takes 100 ms is checked for about 3 s, not the 2 s of a fast one), round_to="auto"'s layer timings
    and the latency model's, each with its estimate, before it waits on them."""
    monkeypatch.setattr(timing, "time_calls", lambda model, inputs, calls, sync: 100.0 * calls)
    with caplog.at_level(logging.INFO, logger="fxprune"), timing.threads(2):
        machine.check(Net().eval(), (X,))
    assert "checking the machine: timing the original at 2 threads and at 1 thread for about 3 s" in caplog.text
    caplog.clear()
    monkeypatch.setattr(timing, "time_calls", FlopClock())
    monkeypatch.setattr(costmodel, "layer_ms", layer_latency)
    with caplog.at_level(logging.INFO, logger="fxprune"):
        fxprune.compile(Net().eval(), speedup=1.5, example_inputs=X, verify=False, cache=False)
    lines = [r.getMessage() for r in caplog.records]
    stages = ["checking the machine", "alone for round_to='auto'", "alone for the latency model", "candidate 1 ("]
    at = [next(k for k, line in enumerate(lines) if stage in line) for stage in stages]
    assert at == sorted(at), lines
    assert all(re.search(r"about \d+ s", lines[k]) for k in at[:3])


def test_layers_of_one_shape_are_announced_as_one_timing(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    """Two layers of one shape share their timings: the estimate counts them once (ResNet-50's 54 layers have 24 shapes).
    The line says whether the timings will be on disk next time: not from a cache held on a noisy machine."""
    class Twins(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1)

        def forward(self, x):
            return self.c(torch.relu(self.b(torch.relu(self.a(x)))))

    a = pipeline.analyze(Twins().eval(), X)
    layers = costmodel.measurable_layers(a.gm, a.deps)
    twins = [i for i, layer in layers.items() if layer.sizes == (64, 64)]
    assert len(twins) == 2
    with caplog.at_level(logging.INFO, logger="fxprune"):
        costmodel.announce(a.deps, layers, [(i, (32, 32)) for i in twins], None, Setting.of(a.gm, a.inputs), TimingCache(), "for a test")
    assert "timing 1 layer width of 1 layer shape alone for a test (about 1 s; kept for next time)" in caplog.text
    held = TimingCache(tmp_path / "held.json")
    held.hold()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fxprune"):
        costmodel.announce(a.deps, layers, [(i, (32, 32)) for i in twins], None, Setting.of(a.gm, a.inputs), held, "for a test")
    assert "(about 1 s; not kept: taken on a machine found noisy)" in caplog.text


class Contention:
    """Other PyTorch work on the cores, in bursts longer than a round, on a virtual clock that advances
    by what it charges: while a burst lasts, every call takes twice as long (the cores are shared) plus,
    on more than one thread, ``stall`` ms (threads waiting for each other), which slows a small model
    more than a large one, so ratios lean towards 1."""

    def __init__(self, bursts: list[tuple[float, float]], stall: float = 200.0) -> None:
        self.clock, self.now, self.bursts, self.stall = FlopClock(), 0.0, bursts, stall

    def busy(self) -> bool:
        return any(start <= self.now < end for start, end in self.bursts)

    def __call__(self, model, inputs, calls, sync) -> float:
        ms = self.clock.true_ms(model, inputs)
        if self.busy():
            ms = 2 * ms + (self.stall if torch.get_num_threads() > 1 else 0.0)
        self.now += ms * calls
        return ms


class TwoSpeeds:
    """A machine that adds ``extra`` ms to every call from virtual time ``start`` on (a cost per call that changes
    with the machine's state, as on a virtual machine whose 2-thread forwards run at two speeds), on a virtual
    clock that advances by what it charges."""

    def __init__(self, start: float, extra: float) -> None:
        self.clock, self.now, self.start, self.extra = FlopClock(), 0.0, start, extra

    def __call__(self, model, inputs, calls, sync) -> float:
        ms = self.clock.true_ms(model, inputs) + (self.extra if self.now >= self.start else 0.0)
        self.now += ms * calls
        return ms


def test_a_compile_with_no_steady_timing_returns_its_result_under_on_noise_warn(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every call 1-1.6 times its cost at random: no timing is steady, so there are no speeds of the original to compare,
    and ``on_noise="warn"`` returns the result with its warnings (the note on two speeds raised ValueError here)."""
    monkeypatch.setattr(costmodel, "layer_ms", layer_latency)
    rng = random.Random(0)
    monkeypatch.setattr(timing, "time_calls", FlopClock(lambda model: rng.uniform(1, 1.6)))
    with pytest.warns(UserWarning):
        pruned = fxprune.compile(Net().eval(), speedup=1.5, example_inputs=X, verify=False, cache=False, round_to=1, on_noise="warn")
    record = pruned.meta["fxprune"]["report"]["latency"]
    assert record["noise"] > timing.STABLE and not [n for n in pruned.meta["fxprune"]["report"]["notes"] if "more than one speed" in n]


@pytest.mark.parametrize("on_noise", ["raise", "warn"])
def test_a_confirming_timing_the_noise_leaves_undecided_is_not_reported(monkeypatch: pytest.MonkeyPatch, on_noise: str) -> None:
    """The machine is quiet for the check and the search, then every call takes 1-3 times its cost at random while the
    chosen result is confirmed: the confirming timing and a third one cannot be told from the target, so the compile
    refuses with MeasurementError (with ``on_noise="warn"``, returns it with a warning) rather than report either."""
    monkeypatch.setattr(costmodel, "layer_ms", layer_latency)
    rng, noisy = random.Random(0), []
    monkeypatch.setattr(timing, "time_calls", FlopClock(lambda model: rng.uniform(1, 3) if noisy else 1.0))
    confirm = targets.trials.Clock.confirm
    monkeypatch.setattr(targets.trials.Clock, "confirm", lambda self, *args: noisy.append(1) or confirm(self, *args))
    run = lambda: fxprune.compile(Net().eval(), speedup=1.5, example_inputs=X, verify=False, cache=False, round_to=1, on_noise=on_noise)
    if on_noise == "raise":
        with pytest.raises(fxprune.MeasurementError, match="too noisy to confirm the result"):
            run()
    else:
        with pytest.warns(UserWarning, match="too noisy to confirm the result"):
            run()
    assert len(noisy) == 2  # the confirming timing and a third


@pytest.mark.parametrize("extra", [0.0, 0.25])
def test_a_compile_whose_timings_catch_the_machine_at_two_speeds_says_so(monkeypatch: pytest.MonkeyPatch, extra: float) -> None:
    """From just after the machine check on, every call costs ``extra`` times the original's time more (less than
    ``DRIFT``, so nothing is timed again): the result meets the target as timed, and its report names both of the
    original's speeds and what the result timed at; on a machine of one speed (0) no such note."""
    monkeypatch.setattr(costmodel, "layer_ms", layer_latency)
    net = Net().eval()
    full = flop_ms(net, (X,))
    monkeypatch.setattr(timing, "time_calls", TwoSpeeds(21 * full, extra * full))
    with timing.threads(2):
        pruned = fxprune.compile(net, speedup=1.25, example_inputs=X, verify=False, cache=False, round_to=1)
    record = pruned.meta["fxprune"]["report"]["latency"]
    assert record["speedup"] >= 1.25
    notes = [n for n in pruned.meta["fxprune"]["report"]["notes"] if "more than one speed" in n]
    if not extra:
        assert not notes
        return
    assert len(notes) == 1 and f"{full:.4g}-{full * (1 + extra):.4g} ms" in notes[0]
    assert f"{record['speedup']:.3g}x with the original at {record['before_ms']:.4g} ms" in notes[0] and "threads=1" in notes[0]


class LoadThatLeaves:
    """A steady load that makes every layer timing, and every whole-model call too when ``models``, ``slow`` times as long
    plus ``extra`` ms (a cost per call, which flattens the layers' timings), until the first whole-model call after a
    loaded layer timing (the first candidate, or the machine checked again): then it leaves, unless it never ``leaves``.
    ``layers`` counts the layer timings taken under the load and after it, ``under_load`` holds what they gave."""

    def __init__(self, models: bool, leaves: bool = True, slow: float = 1.7, extra: float = 20.0) -> None:
        self.clock, self.models, self.leaves, self.slow, self.extra = FlopClock(), models, leaves, slow, extra
        self.gone, self.layers, self.under_load = False, {True: 0, False: 0}, set()

    def __call__(self, model, inputs, calls, sync) -> float:
        self.gone = self.gone or (self.leaves and self.layers[True] > 0)
        ms = self.clock.true_ms(model, inputs)
        return self.loaded(ms) if self.models else ms

    def loaded(self, ms: float) -> float:
        return ms if self.gone else self.slow * ms + self.extra

    def layer(self, layer: nn.Module, x: torch.Tensor) -> Latency:
        self.layers[not self.gone] += 1
        ms = self.loaded(flop_ms(layer, (x,)))
        self.under_load |= set() if self.gone else {ms}
        return Latency(ms, ms, ms, 9, int(x.shape[0]), Setting.of(layer, (x,)), ms, ms)


def test_a_load_that_leaves_after_the_layer_timings_gets_them_taken_again(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The machine check and the layer timings run under a steady load, which leaves as the first candidate is timed:
    the original runs 1.7 times as fast as checked, so the machine is checked again, the layers are timed again (the
    loaded ones flattened the latency model's estimates) and taken off the cache, and the result's estimate agrees
    with its timing."""
    monkeypatch.setenv("FXPRUNE_CACHE_DIR", str(tmp_path))
    load = LoadThatLeaves(models=True)
    monkeypatch.setattr(timing, "time_calls", load)
    monkeypatch.setattr(costmodel, "layer_ms", load.layer)
    pruned = fxprune.compile(Net().eval(), speedup=1.5, example_inputs=X, verify=False, round_to=1)
    record = pruned.meta["fxprune"]["report"]["latency"]
    assert record["speedup"] >= 1.5 and load.layers[False] == load.layers[True] > 0
    assert record["estimated_speedup"] == pytest.approx(record["speedup"], rel=0.1)
    kept = json.loads((tmp_path / "latency.json").read_text())
    layer_rows = [row for table in kept.values() for key, row in table.items() if not key.startswith(("model ", "round_to"))]
    assert layer_rows and not {row[0] for row in layer_rows} & load.under_load


@pytest.mark.parametrize("leaves", [True, False])
def test_layers_timed_alone_slower_than_the_whole_model_are_timed_again(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture, leaves: bool) -> None:
    """The machine checks find the original quiet, but other work held the cores while the layers were timed alone: they
    add up to more than ``LOADED`` times the whole model, so the machine is checked again and the layers timed again, and
    the result's estimate agrees with its timing; where the load stays on the layers, a warning, and the search's timings
    still reach the target. No loaded timing stays in the cache."""
    monkeypatch.setenv("FXPRUNE_CACHE_DIR", str(tmp_path))
    load = LoadThatLeaves(models=False, leaves=leaves, slow=3.0)  # the machine checks find it quiet
    monkeypatch.setattr(timing, "time_calls", load)
    monkeypatch.setattr(costmodel, "layer_ms", load.layer)
    with caplog.at_level(logging.INFO, logger="fxprune"):
        pruned = fxprune.compile(Net().eval(), speedup=1.5, example_inputs=X, verify=False, round_to=1)
    assert "times as long as the whole model at the machine check" in caplog.text and "checking the machine again" in caplog.text
    record = pruned.meta["fxprune"]["report"]["latency"]
    assert record["speedup"] >= 1.5 and ("twice" in caplog.text) is not leaves
    if leaves:
        assert record["estimated_speedup"] == pytest.approx(record["speedup"], rel=0.1)
    kept = json.loads((tmp_path / "latency.json").read_text())
    layer_rows = [row for table in kept.values() for key, row in table.items() if not key.startswith(("model ", "round_to"))]
    assert bool(layer_rows) is leaves and not {row[0] for row in layer_rows} & load.under_load  # twice loaded: none kept


def test_loaded_layer_timings_an_earlier_compile_kept_are_taken_off_the_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An earlier compile kept layer timings taken under load (its rule off); a quiet compile that reads them finds its
    layers alone slower than the whole model, takes them off the cache, times them again and estimates its result right."""
    monkeypatch.setenv("FXPRUNE_CACHE_DIR", str(tmp_path))
    load = LoadThatLeaves(models=False, leaves=False, slow=3.0)
    monkeypatch.setattr(timing, "time_calls", load)
    monkeypatch.setattr(costmodel, "layer_ms", load.layer)
    with monkeypatch.context() as off:
        off.setattr(costmodel, "LOADED", math.inf)
        fxprune.compile(Net().eval(), speedup=1.5, example_inputs=X, verify=False, round_to=1)
    load.gone = True  # quiet from now on
    pruned = fxprune.compile(Net().eval(), speedup=2.0, example_inputs=X, verify=False, round_to=1)
    record = pruned.meta["fxprune"]["report"]["latency"]
    assert record["speedup"] >= 2.0 and record["estimated_speedup"] == pytest.approx(record["speedup"], rel=0.1)
    kept = json.loads((tmp_path / "latency.json").read_text())
    assert not {row[0] for table in kept.values() for key, row in table.items() if not key.startswith(("model ", "round_to"))} & load.under_load


class PassingLoad(Contention):
    """``Contention`` from the first call after the layer timings (the first candidate's timing) until the machine is
    checked again (its first 1-thread call)."""

    def __init__(self) -> None:
        super().__init__([])
        self.state = "before"  # before, loaded, after

    def busy(self) -> bool:
        if self.state == "loaded" and torch.get_num_threads() == 1:
            self.state = "after"
        return self.state == "loaded"

    def layer(self, layer: nn.Module, x: torch.Tensor) -> Latency:
        self.state = "loaded"
        return layer_latency(layer, x)


def test_a_timing_taken_under_a_load_that_left_before_the_second_check_decides_nothing(monkeypatch: pytest.MonkeyPatch,
                                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """The load comes with the first candidate's timings (the original drifts, twice, so the machine is checked again)
    and has left by that check, which finds the original at its first speed: the search starts afresh without the
    loaded timing (the stalls flattened that plan's 1.6x to 1.27x), and the result meets the target within 1.3 times."""
    load = PassingLoad()
    monkeypatch.setattr(timing, "time_calls", load)
    monkeypatch.setattr(costmodel, "layer_ms", load.layer)
    net = Net().eval()
    full = flop_ms(net, (X,))
    with timing.threads(2), caplog.at_level(logging.INFO, logger="fxprune"):
        pruned = fxprune.compile(net, speedup=1.5, example_inputs=X, verify=False, cache=False, round_to=1)
    assert "checking it again and searching afresh" in caplog.text and load.state == "after"
    record = pruned.meta["fxprune"]["report"]["latency"]
    assert 1.5 <= full / flop_ms(pruned, (X,)) <= 1.3 * 1.5 and record["speedup"] >= 1.5
    assert "without that candidate's timing" in caplog.text
    assert record["results_timed"] <= 5  # from its flattened 1.27x the search crept towards the target: 9 results, 1.68x


@pytest.mark.parametrize("length", [20, 80, 160, 10 ** 4])
def test_contention_in_long_bursts_never_over_prunes(monkeypatch: pytest.MonkeyPatch, length: int) -> None:
    """Contention starts right after the machine check and lasts ``length`` forwards of the original
    (longer than a round; 10**4: to the end): timings taken in it are timed again or refused, and a
    result comes back only when it truly meets the target and is at most 1.3x past it. (Without the
    check on the original's drift, 160 returned 2.03x "because the widths step" and 10**4 returned a
    2.52x result reported as 1.52x.)"""
    monkeypatch.setattr(costmodel, "layer_ms", layer_latency)
    net = Net().eval()
    full = flop_ms(net, (X,))
    monkeypatch.setattr(timing, "time_calls", Contention([(21 * full, (21 + length) * full)]))
    with timing.threads(2):
        try:
            pruned = fxprune.compile(net, speedup=1.5, example_inputs=X, verify=False, cache=False, round_to=1)
        except fxprune.MeasurementError as exc:
            assert length > 80 and ("load changed" in str(exc) or "stall" in str(exc))  # or the machine checked again refused
            return
    assert 1.5 <= full / flop_ms(pruned, (X,)) <= 1.3 * 1.5


def test_timings_that_contradict_the_width_order_are_timed_again_or_refused(monkeypatch: pytest.MonkeyPatch,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    """The first candidate times 1.3x its FLOPs' cost (it misses 1.5x), so the search tries a narrower
    one, which a burst makes 3x slower for its first ``burst`` calls: narrower and slower than a wider
    one contradicts the width order. Both are timed again; a burst that has passed lets the search go
    on to a result that truly meets the target, one that lasts gets MeasurementError."""
    monkeypatch.setattr(costmodel, "layer_ms", layer_latency)
    net = Net().eval()

    def install(burst: int) -> None:
        clock, seen, calls = FlopClock(), [], {}

        def factor(model: nn.Module) -> float:
            seen.append(model) if model not in seen else None
            calls[id(model)] = calls.get(id(model), 0) + 1
            if len(seen) > 1 and model is seen[1]:
                return 1.3
            return 3.0 if len(seen) > 2 and model is seen[2] and calls[id(model)] <= burst else 1.0

        clock.factor = factor
        monkeypatch.setattr(timing, "time_calls", clock)

    install(burst=10 ** 6)
    with caplog.at_level("INFO", logger="fxprune"), pytest.raises(fxprune.MeasurementError, match="contradict the widths"):
        fxprune.compile(net, speedup=1.5, example_inputs=X, verify=False, cache=False, round_to=1)
    assert "timing both again" in caplog.text
    caplog.clear()
    install(burst=18)
    with caplog.at_level("INFO", logger="fxprune"):
        pruned = fxprune.compile(net, speedup=1.5, example_inputs=X, verify=False, cache=False, round_to=1)
    assert "timing both again" in caplog.text
    assert flop_ms(net, (X,)) / flop_ms(pruned, (X,)) >= 1.5


def test_a_third_of_the_rounds_in_bursts_is_not_over_a_third() -> None:
    """4 of 12 and 3 of 9 rounds hit: exactly ``BURSTY``, which refuses only above it (1 - 8/12 is a hair over 1/3)."""
    for rounds, hit in ((12, 4), (9, 3)):
        first = [10.0] * rounds
        second = [15.0] * hit + [10.0 + 0.01 * k for k in range(rounds - hit)]
        noise, bursts, _ = machine._aa(first, second)
        assert bursts == hit / rounds and not bursts > machine.BURSTY


def test_stalled_threads_refuse_in_seconds_and_name_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two threads stall (a 2-thread call takes 4x a 1-thread one): the machine check refuses before any
    layer is timed and names threads=1; at threads=1 the same target is met, and the latency says 1 thread."""
    clock = FlopClock(lambda model: 4.0 if torch.get_num_threads() > 1 else 1.0)
    monkeypatch.setattr(timing, "time_calls", clock)
    timed = []
    monkeypatch.setattr(costmodel, "layer_ms", lambda layer, x: timed.append(layer) or layer_latency(layer, x))
    with timing.threads(2), pytest.raises(fxprune.MeasurementError, match=r"2 threads stall .*threads=1 \(--threads 1;"):
        fxprune.compile(Net().eval(), speedup=1.5, example_inputs=X, verify=False, cache=False, round_to=8)
    assert not timed
    with timing.threads(2):
        pruned = fxprune.compile(Net().eval(), speedup=1.5, example_inputs=X, verify=False, cache=False, threads=1)
        assert torch.get_num_threads() == 2
    record = fxprune.report(pruned).latency
    assert record["threads"] == 1 and record["interval"][0] >= 1.5 and "1 threads" in fxprune.report(pruned).summary()


def test_a_plan_that_removes_nothing_never_reports_a_speedup(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model with nothing prunable, on a clock that always charges its original twice: an identical
    model would time 2x faster, but a plan that removes nothing is 1x by definition."""
    monkeypatch.setattr(timing, "time_calls", FlopClock(Bursts(share=2.5, seed=0)))  # a burst on every timing of it
    monkeypatch.setattr(costmodel, "layer_ms", layer_latency)
    with pytest.raises(fxprune.TargetUnreachableError, match=r"was 1x") as info:
        fxprune.compile(nn.Linear(16, 10).eval(), speedup=1.5, example_inputs=torch.randn(1, 16), verify=False)
    assert info.value.best_speedup == 1.0


def test_a_cached_result_that_no_longer_holds_is_timed_afresh(fake_clock: FlopClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache says a result is 1.5x faster; timed again now, every model takes as long as the
    original (the clock changed): the claim is dropped from the cache, not replayed."""
    monkeypatch.setenv("FXPRUNE_CACHE_DIR", str(tmp_path))
    net = Net().eval()
    fxprune.compile(net, speedup=1.5, example_inputs=X, verify=False)
    monkeypatch.setattr(timing, "time_calls", lambda model, inputs, calls, sync: 1.0)
    with pytest.raises(fxprune.TargetUnreachableError, match=r"was 1x"):
        fxprune.compile(net, speedup=1.5, example_inputs=X, verify=False)
    (table,) = json.loads((tmp_path / "latency.json").read_text()).values()
    kept = [json.loads(json.dumps(v))[0] for k, v in table.items() if k.startswith("model ") and "original" not in k]
    assert all(ratio > 1 / 1.5 for ratio in kept)  # no faster-than-asked comparison is left to replay


def test_cache_false_and_the_cache_command(fake_clock: FlopClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from fxprune.cli import main

    monkeypatch.setenv("FXPRUNE_CACHE_DIR", str(tmp_path))
    fxprune.compile(Net().eval(), speedup=1.5, example_inputs=X, verify=False, cache=False)
    assert not (tmp_path / "latency.json").exists()
    fxprune.compile(Net().eval(), speedup=1.5, example_inputs=X, verify=False)
    assert (tmp_path / "latency.json").exists()
    assert main(["cache", "info"]) == 0 and "layer timings" in capsys.readouterr().out
    assert main(["cache", "clear"]) == 0 and not (tmp_path / "latency.json").exists()


def test_round_to_auto_falls_back_to_a_finer_multiple_that_reaches_the_target() -> None:
    """Grouped convs of 8 channels per group stay whole at multiples of 8: the default falls back, says
    so, and reaches ratio=0.5 as round_to=1 does."""
    model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3, groups=4), nn.ReLU(),
                          nn.Conv2d(64, 64, 3, groups=8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()
    x = torch.randn(1, 3, 32, 32)
    pruned = fxprune.compile(model, ratio=0.5, example_inputs=x)
    rep = fxprune.report(pruned)
    assert 0.47 <= 1 - rep.flops[1] / rep.flops[0] and rep.flops[1] <= rep.flops[0] / 2
    assert any("do not reach ratio=0.5" in n for n in rep.notes)
    assert pruned.meta["fxprune"]["strategy"]["round_to"] < 8


def test_regnet_prunes_with_the_defaults() -> None:
    import torchvision

    pruned = fxprune.compile(torchvision.models.regnet_y_400mf(), ratio=0.5, verify=False)
    flops = fxprune.report(pruned).flops
    assert 1 - flops[1] / flops[0] >= 0.45


def test_the_estimated_column_adds_up_and_explains_rising_rows(fake_clock: FlopClock) -> None:
    pruned = fxprune.compile(Net().eval(), speedup=1.5, example_inputs=X, verify=False)
    rep = fxprune.report(pruned)
    rows = rep.estimated_ms()
    assert rep.estimated_total() == pytest.approx((sum(b for b, _ in rows.values()), sum(a for _, a in rows.values())))
    assert not any("timed slower alone" in n for n in rep.all_notes())
    rep.latency["layers_ms"]["c"] = [1.0, 2.0]
    text = str(rep)
    assert "1 -> 2 *" in text and "timed slower alone at their kept widths" in text and "rows add up to" in text


def by_speedup(monkeypatch: pytest.MonkeyPatch, factor) -> None:
    """Time with a FlopClock whose timing of a model is scaled by ``factor(model, speed-up)``, its true
    speed-up over the first model timed (the original)."""
    clock, first = FlopClock(), []

    def scaled(model: nn.Module) -> float:
        first.append(model) if not first else None
        return factor(model, clock.true_ms(first[0], (X,)) / clock.true_ms(model, (X,)))

    clock.factor = scaled
    monkeypatch.setattr(timing, "time_calls", clock)


def test_a_latency_model_off_by_the_same_factor_each_time_costs_one_timing_again(monkeypatch: pytest.MonkeyPatch,
                                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Every pruned model times 1.67x faster than its FLOPs say (MobileNetV2 at batch 8, whose page faults the layer
    timings do not see, ran 1.5-1.7x faster than estimated): the first candidate that far from its estimate is timed
    again before it is believed, and later ones are not, since they are as far off as the search has seen."""
    by_speedup(monkeypatch, lambda model, speedup: 1.0 if speedup == 1.0 else 0.6)
    monkeypatch.setattr(costmodel, "layer_ms", layer_latency)
    with caplog.at_level(logging.INFO, logger="fxprune"):
        pruned = fxprune.compile(Net().eval(), speedup=2.5, example_inputs=X, verify=False, cache=False)
    assert caplog.text.count("candidate ") >= 2 and caplog.text.count("timing it again before believing it") == 1
    assert pruned.meta["fxprune"]["report"]["latency"]["speedup"] >= 2.5


def test_a_timing_near_its_own_estimate_is_believed_after_one_far_from_it(monkeypatch: pytest.MonkeyPatch,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """Only models pruned past 2x time 1.67x faster than their FLOPs say (a latency model whose fixed part was timed
    too slow errs more the more is pruned): the first far from its estimate is timed again; a lighter one that
    measures as estimated is believed, though the search's timings so far ran faster than estimated."""
    by_speedup(monkeypatch, lambda model, speedup: 0.6 if speedup > 2.0 else 1.0)
    monkeypatch.setattr(costmodel, "layer_ms", layer_latency)
    with caplog.at_level(logging.INFO, logger="fxprune"):
        fxprune.compile(Net().eval(), speedup=2.5, example_inputs=X, verify=False, cache=False)
    assert caplog.text.count("candidate ") >= 2 and caplog.text.count("timing it again before believing it") == 1


def test_a_result_far_past_the_target_is_not_returned_while_nearer_ones_are_undecided(monkeypatch: pytest.MonkeyPatch) -> None:
    """Results truly 1.4-1.95x faster time at random (0.5-2x their cost): undecidable; only results
    pruned past 1.95x (1.3 times the 1.5x asked) can meet the target. The compile refuses rather than
    return one of those, or returns it with a warning under on_noise="warn"."""
    def install() -> None:
        rng = random.Random(0)
        by_speedup(monkeypatch, lambda model, speedup: rng.uniform(0.5, 2.0) if 1.4 <= speedup <= 1.95 else 1.0)

    monkeypatch.setattr(costmodel, "layer_ms", layer_latency)
    install()
    with pytest.raises(fxprune.MeasurementError, match="too noisy to find a result near speedup=1.5"):
        fxprune.compile(Net().eval(), speedup=1.5, example_inputs=X, verify=False, cache=False)
    install()
    with pytest.warns(UserWarning, match="too noisy to find a result near"):
        pruned = fxprune.compile(Net().eval(), speedup=1.5, example_inputs=X, verify=False, cache=False, on_noise="warn")
    assert pruned.meta["fxprune"]["report"]["latency"]["speedup"] > 1.95


def test_a_compile_that_refuses_on_noise_leaves_none_of_its_timings_in_the_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The machine check finds the machine quiet, so the layer timings and comparisons are kept as they are taken; then
    results near the target time at random and the compile refuses. Its timings may sit in the onset of that load, so
    they leave the cache again (round_to="auto"'s decision stays: it is kept even on a noisy machine): the next compile
    times the layers afresh (it built its latency model from them before). A compile that returns keeps its timings."""
    monkeypatch.setenv("FXPRUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(costmodel, "layer_ms", layer_latency)
    rng = random.Random(0)
    by_speedup(monkeypatch, lambda model, speedup: rng.uniform(0.5, 2.0) if 1.4 <= speedup <= 1.95 else 1.0)
    with pytest.raises(fxprune.MeasurementError, match="too noisy"):
        fxprune.compile(Net().eval(), speedup=1.5, example_inputs=X, verify=False)
    (table,) = json.loads((tmp_path / "latency.json").read_text()).values()
    assert table and all(k.startswith("round_to=auto ") for k in table), table
    monkeypatch.setattr(timing, "time_calls", FlopClock())
    pruned = fxprune.compile(Net().eval(), speedup=1.5, example_inputs=X, verify=False)
    assert pruned.meta["fxprune"]["report"]["latency"]["timings_taken"] > 0
    (table,) = json.loads((tmp_path / "latency.json").read_text()).values()
    assert any(k.startswith("Conv2d[1, ") for k in table) and any(k.startswith("model ") for k in table)


def test_a_result_far_past_the_target_gives_way_to_a_plan_between(monkeypatch: pytest.MonkeyPatch) -> None:
    """Results truly 1.5-1.7x faster always time 1.2x (a kernel that is slow at those widths), so the
    plans nearest the target miss; the search goes on between the results on either side, and one within
    1.3x of the 1.5x asked comes back, with no note blaming the widths."""
    monkeypatch.setattr(costmodel, "layer_ms", layer_latency)
    by_speedup(monkeypatch, lambda model, truth: truth / 1.2 if 1.5 <= truth < 1.7 else 1.0)
    net = Net().eval()
    pruned = fxprune.compile(net, speedup=1.5, example_inputs=X, verify=False, cache=False, round_to=1)
    truth = flop_ms(net, (X,)) / flop_ms(pruned, (X,))
    assert 1.7 <= truth <= 1.3 * 1.5, truth
    assert not any("widths step" in n for n in fxprune.report(pruned).notes)


CONFIRM = targets.trials.Clock.confirm


def on_confirm(monkeypatch: pytest.MonkeyPatch, change: Callable[[timing.Comparison, int], timing.Comparison]) -> list:
    """Every confirming timing as ``change(its comparison, how many came before it)`` says; the plans confirmed, in order."""
    plans: list = []

    def confirm(self, plan, *how):
        plans.append(plan)
        return change(CONFIRM(self, plan, *how), len(plans) - 1)

    monkeypatch.setattr(targets.trials.Clock, "confirm", confirm)
    return plans


def slower(c: timing.Comparison, factor: float) -> timing.Comparison:
    """``c`` with its ratio and interval ``factor`` times slower."""
    return dataclasses.replace(c, ratio=c.ratio * factor, low=c.low * factor, high=c.high * factor)


def reaching_past_1_5x(c: timing.Comparison, _: int = 0) -> timing.Comparison:
    """``c`` with its interval reaching past the goal of 1.5x asked."""
    return dataclasses.replace(c, high=max(c.high, 1 / 1.5 * 1.01))


def test_a_note_on_a_result_far_past_the_target_quotes_the_speed_up_the_report_gives(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every plan short of 2x times 1.4x slower than it is, so the result lies far past the 1.5x asked and a
    note says so; its confirming timing reads 3% faster than the candidate's timing did, and
    the note quotes the confirmed figure, the one the report's latency line gives (it quoted the other)."""
    monkeypatch.setattr(costmodel, "layer_ms", layer_latency)
    by_speedup(monkeypatch, lambda model, truth: 1.4 if 1.02 < truth < 2.0 else 1.0)
    on_confirm(monkeypatch, lambda c, _: slower(c, 0.97))
    pruned = fxprune.compile(Net().eval(), speedup=1.5, example_inputs=X, verify=False, cache=False, round_to=1)
    report = fxprune.report(pruned)
    (note,) = [n for n in report.notes if "more than 1.3 times" in n]
    assert note.startswith(f"the result measured {report.latency['speedup']:.3g}x,")


def test_a_remembered_result_far_past_the_target_says_an_earlier_compile_chose_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every plan short of 2x times 1.4x slower than it is, so the result lies far past the 1.5x asked and its
    note says why. A warm compile returns the remembered result after timing it alone: its note says an earlier
    compile chose it, not that this one found no wider plan."""
    monkeypatch.setenv("FXPRUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(costmodel, "layer_ms", layer_latency)
    by_speedup(monkeypatch, lambda model, truth: 1.4 if 1.02 < truth < 2.0 else 1.0)
    first, second = (fxprune.compile(Net().eval(), speedup=1.5, example_inputs=X, verify=False, round_to=1) for _ in range(2))
    assert first.meta["fxprune"]["plan"] == second.meta["fxprune"]["plan"]
    assert fxprune.report(second).latency["results_timed"] == 1
    (note,) = [n for n in fxprune.report(second).notes if "more than 1.3 times" in n]
    assert note.endswith("an earlier compile here chose it (the timing cache remembers its widths), and this one timed no other plan")


def test_a_result_the_confirming_timing_puts_far_past_the_target_says_the_machine_moved(monkeypatch: pytest.MonkeyPatch) -> None:
    """The search chose a result near the 1.5x asked, and its confirming timing read it 1.5 times faster (the
    machine's speed moved between the two; ResNet-18 at 112x112: a plan chosen near 1.3x confirmed at 1.68x): the
    report's figure is more than 1.3x past the target, so a note says so, and why, quoting both timings."""
    monkeypatch.setattr(costmodel, "layer_ms", layer_latency)
    monkeypatch.setattr(timing, "time_calls", FlopClock())
    on_confirm(monkeypatch, lambda c, _: slower(c, 1 / 1.5))
    pruned = fxprune.compile(Net().eval(), speedup=1.5, example_inputs=X, verify=False, cache=False)
    report = fxprune.report(pruned)
    chosen = report.latency["speedup"] / 1.5
    (note,) = [n for n in report.notes if "more than 1.3 times" in n]
    assert note == (f"the result measured {report.latency['speedup']:.3g}x, more than 1.3 times the 1.5x asked for: the search chose it "
                    f"at {chosen:.3g}x, and the machine's speed moved between that timing and this one")


def test_a_result_far_past_the_target_where_the_speed_does_not_step_is_not_remembered(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Under a torch load ResNet-18's compile returned 2.42x for the 1.5x asked, and the quiet compile after it returned
    the same plan at 2.47x: it had remembered it. A result that far past the target is kept for the next compile only
    where the speed steps (``test_a_remembered_result_far_past_the_target_says_an_earlier_compile_chose_it``): here its
    confirming timing read it 1.5 times faster than the search did, so the next compile searches again."""
    monkeypatch.setenv("FXPRUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(costmodel, "layer_ms", layer_latency)
    monkeypatch.setattr(timing, "time_calls", FlopClock())
    moved = [True]
    on_confirm(monkeypatch, lambda c, _: slower(c, 1 / 1.5) if moved[0] else c)
    first = fxprune.report(fxprune.compile(Net().eval(), speedup=1.5, example_inputs=X, verify=False))
    assert [n for n in first.notes if "more than 1.3 times" in n]
    moved[0] = False
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fxprune"):
        second = fxprune.report(fxprune.compile(Net().eval(), speedup=1.5, example_inputs=X, verify=False))
    assert "an earlier compile chose a result" not in caplog.text and "candidate 1" in caplog.text
    assert not [n for n in second.notes if "more than 1.3 times" in n]


def test_a_confirming_timing_that_disagrees_with_the_search_is_outvoted_by_a_third(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first confirming timing reads the result 1.3 times faster than the search timed it (MobileNetV2 at
    batch 8: chosen at 2.56x, confirmed at 3.18x, re-measured 2.65x): the result is timed a third time, and the
    report gives the confirming timing nearer the median of the three, with a note that quotes all three."""
    monkeypatch.setattr(costmodel, "layer_ms", layer_latency)
    monkeypatch.setattr(timing, "time_calls", FlopClock())
    plans = on_confirm(monkeypatch, lambda c, k: slower(c, 1 / 1.3) if k == 0 else c)
    pruned = fxprune.compile(Net().eval(), speedup=1.5, example_inputs=X, verify=False, cache=False)
    latency = fxprune.report(pruned).latency
    truth = flop_ms(Net().eval(), (X,)) / flop_ms(pruned, (X,))
    assert len(plans) == 2 and plans[0] == plans[1]
    assert latency["speedup"] == pytest.approx(truth, rel=0.02)
    (note,) = [n for n in fxprune.report(pruned).notes if "the machine ran otherwise" in n]
    assert f"then {1.3 * truth:.3g}x and {latency['speedup']:.3g}x" in note


def test_a_held_cache_keeps_its_claims_and_a_remembered_result_needs_no_layer_timings(fake_clock: FlopClock, tmp_path: Path,
                                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A compile on a machine found noisy holds its timings (none reach the disk) but still keeps its result,
    a claim that is timed again before use. A warm compile that finds only that result on disk (no layer or
    candidate timings) times round_to="auto"'s layers again and nothing else besides the result, once, and
    returns the same plan."""
    held = TimingCache(tmp_path / "held.json")
    setting = Setting.of(nn.Linear(2, 2), (torch.randn(1, 2),))
    held.hold()
    held.get(setting, "a timing", lambda: [1.0])
    held.put(setting, "a claim", [2.0])
    held.save()
    assert json.loads((tmp_path / "held.json").read_text()) == {setting.key(): {"a claim": [2.0]}}

    monkeypatch.setenv("FXPRUNE_CACHE_DIR", str(tmp_path))
    net = Net().eval()
    first = fxprune.compile(net, speedup=1.5, example_inputs=X, verify=False)
    path = tmp_path / "latency.json"
    (key, table), = json.loads(path.read_text()).items()
    path.write_text(json.dumps({key: {k: v for k, v in table.items() if " result " in k}}))  # the result alone
    second = fxprune.compile(net, speedup=1.5, example_inputs=X, verify=False)
    record = second.meta["fxprune"]["report"]["latency"]
    multiple_only = TimingCache(tmp_path / "multiple.json")
    targets.measure_round_to(pipeline.analyze(net, X), fxprune.Strategy().chooser(), timed=True, cache=multiple_only)
    assert record["timings_taken"] == multiple_only.measured > 0
    assert record["results_timed"] == 1 and "layers_ms" not in record
    assert second.meta["fxprune"]["plan"] == first.meta["fxprune"]["plan"]


def test_a_machine_that_changes_speed_for_good_is_checked_again_and_searched_afresh(monkeypatch: pytest.MonkeyPatch,
                                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Every call runs twice as fast from some point after the machine check to the end (a virtual machine
    moving to a faster regime, or load that went away): the candidates' originals drift 2x off the checked
    speed, the machine is checked again once, and the search afresh returns a result that meets the target
    (it used to refuse with "the load changed"). It starts from the timing taken at the new speed: that plan
    is not timed a third time (it was, as the fresh search's first candidate)."""
    monkeypatch.setattr(costmodel, "layer_ms", layer_latency)
    net = Net().eval()
    full = flop_ms(net, (X,))
    clock = Contention([])
    monkeypatch.setattr(timing, "time_calls", lambda model, inputs, calls, sync: clock(model, inputs, calls, sync) * (0.5 if clock.now > 25 * full else 1.0))
    with caplog.at_level(logging.INFO, logger="fxprune"):
        pruned = fxprune.compile(net, speedup=1.5, example_inputs=X)
    assert "checking it again and searching afresh" in caplog.text
    assert "candidate 1 (" in caplog.text and "candidate 2 (the latency model's plan" not in caplog.text
    assert 1.5 <= full / flop_ms(pruned, (X,)) <= 1.3 * 1.5


def test_a_remembered_result_that_misses_now_starts_a_fresh_search_from_its_timing(fake_clock: FlopClock, tmp_path: Path,
                                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """The machine changed between two compiles: every call now costs a fixed 40 ms more (a third of the
    original), which brings every ratio nearer 1, so the remembered result misses the target. The warm compile drops the cached
    comparisons (taken on the other machine), starts the search from the remembered result's new timing
    instead of timing it again, searches once, and returns a result that meets the target on the new clock."""
    monkeypatch.setenv("FXPRUNE_CACHE_DIR", str(tmp_path))
    net = Net().eval()
    first = fxprune.compile(net, speedup=1.5, example_inputs=X, verify=False)
    monkeypatch.setattr(timing, "time_calls", lambda model, inputs, calls, sync: fake_clock.true_ms(model, inputs) + 40.0)
    with caplog.at_level(logging.INFO, logger="fxprune"):
        second = fxprune.compile(net, speedup=1.5, example_inputs=X, verify=False)
    log = caplog.text
    assert "searching afresh from it" in log and "did not hold when timed again" not in log
    assert log.count("confirming it against the original") == 1  # the remembered result is timed once
    record = second.meta["fxprune"]["report"]["latency"]
    assert record["speedup"] >= 1.5 and second.meta["fxprune"]["plan"] != first.meta["fxprune"]["plan"]
    assert (fake_clock.true_ms(net, (X,)) + 40.0) / (fake_clock.true_ms(second, (X,)) + 40.0) >= 1.5


def test_a_result_whose_confirming_interval_holds_the_target_is_remembered_and_timed_first(fake_clock: FlopClock, tmp_path: Path,
                                                                                          monkeypatch: pytest.MonkeyPatch,
                                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """The confirming timing's median meets the target, but its interval, widened by the noise, holds it (ResNet-50's
    2.10x for 2x asked, 2.08-2.17x, 4.7%): the compile returns the result, and remembers it, so that a warm compile
    times it first and returns it when it meets the target then, instead of searching from nothing again."""
    monkeypatch.setenv("FXPRUNE_CACHE_DIR", str(tmp_path))
    on_confirm(monkeypatch, reaching_past_1_5x)
    net = Net().eval()
    first = fxprune.compile(net, speedup=1.5, example_inputs=X, verify=False)
    assert first.meta["fxprune"]["report"]["latency"]["speedup"] >= 1.5
    monkeypatch.setattr(targets.trials.Clock, "confirm", CONFIRM)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fxprune"):
        second = fxprune.compile(net, speedup=1.5, example_inputs=X, verify=False)
    assert "an earlier compile chose a result" in caplog.text and "candidate 1 (" not in caplog.text
    assert second.meta["fxprune"]["plan"] == first.meta["fxprune"]["plan"]


def test_a_result_whose_confirming_timing_misses_starts_the_search_afresh_from_that_timing(fake_clock: FlopClock,
                                                                                             monkeypatch: pytest.MonkeyPatch,
                                                                                             caplog: pytest.LogCaptureFixture) -> None:
    """The first confirming timing, and the third that it calls for, read the chosen result 30% slower than its
    candidate timing did (the machine's speed moved between them): the search starts afresh from that timing, as
    from a remembered result that misses, rather than from the latency model's plan, which it had timed already."""
    calls = on_confirm(monkeypatch, lambda c, before: c if before > 1 else slower(c, 1.3))
    with caplog.at_level(logging.INFO, logger="fxprune"):
        pruned = fxprune.compile(Net().eval(), speedup=1.5, example_inputs=X, verify=False, cache=False)
    before, _, after = caplog.text.partition("did not hold when timed again")
    assert after and "candidate 1 (the latency model's plan" in before and "the latency model's plan" not in after
    assert len(calls) == 3 and pruned.meta["fxprune"]["report"]["latency"]["speedup"] >= 1.5


def test_a_result_whose_confirming_timings_keep_missing_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every confirming timing reads its result 30% slower than the search did (the machine slows whenever a result is
    confirmed): after the search afresh, the second result's confirmation misses the 1.5x asked too. That result
    was returned with the missed figure as its report; now it is ``MeasurementError``, or with ``on_noise="warn"``
    the result and a warning that gives both timings."""
    monkeypatch.setattr(costmodel, "layer_ms", layer_latency)
    monkeypatch.setattr(timing, "time_calls", FlopClock())
    on_confirm(monkeypatch, lambda c, _: slower(c, 1.3))
    with pytest.raises(fxprune.MeasurementError, match=r"short of the 1.5x asked: the machine's speed on cpu moved under the compile"):
        fxprune.compile(Net().eval(), speedup=1.5, example_inputs=X, verify=False, cache=False)
    with pytest.warns(UserWarning, match=r"timed again to confirm it, short of the 1.5x asked"):
        pruned = fxprune.compile(Net().eval(), speedup=1.5, example_inputs=X, verify=False, cache=False, on_noise="warn")
    assert fxprune.report(pruned).latency["speedup"] < 1.5


def test_a_result_confirmed_barely_past_the_target_is_searched_past_once(fake_clock: FlopClock, monkeypatch: pytest.MonkeyPatch,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """The first confirming timing, and the third that it calls for, read the result 1% past the 1.5x asked: true now,
    false after the machine moves a few percent (ResNet-18 confirmed 1.27x for 1.25x and re-measured 1.24x seconds
    later). The search runs afresh from that timing, once, as for a result that missed, and prefers a result with
    3% to spare: not that one again."""
    calls = on_confirm(monkeypatch, lambda c, before: c if before > 1 else slower(c, 1 / 1.5 / 1.01 / c.ratio))
    with caplog.at_level(logging.INFO, logger="fxprune"):
        pruned = fxprune.compile(Net().eval(), speedup=1.5, example_inputs=X, verify=False, cache=False)
    assert "held by under 3% when timed again" in caplog.text and len(calls) == 3
    assert pruned.meta["fxprune"]["report"]["latency"]["speedup"] >= 1.5
    assert targets.trials.widths(calls[2]) != targets.trials.widths(calls[0])  # not the same plan, which had too little room


def test_a_remembered_result_the_noise_leaves_undecided_is_searched_from_with_the_cached_comparisons(
        fake_clock: FlopClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Timed again, the remembered result's interval holds the target (ResNet-50 at 2.14x, 2.08-2.25x, for 2x): nothing
    says the machine changed, so the warm compile searches from that timing keeping the cached comparisons; one that
    clearly misses drops them (``test_a_remembered_result_that_misses_now_starts_a_fresh_search_from_its_timing``)."""
    monkeypatch.setenv("FXPRUNE_CACHE_DIR", str(tmp_path))
    net = Net().eval()
    fxprune.compile(net, speedup=1.5, example_inputs=X, verify=False)
    dropped: list = []
    on_confirm(monkeypatch, reaching_past_1_5x)
    monkeypatch.setattr(targets.trials.Clock, "drop", lambda self: dropped.append(self))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fxprune"):
        fxprune.compile(net, speedup=1.5, example_inputs=X, verify=False)
    assert "it cannot be told from the target now: searching afresh from it" in caplog.text and not dropped


def test_a_remembered_result_the_noise_left_undecided_once_is_timed_once_more_before_a_search(
        fake_clock: FlopClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A burst during the warm compile's first timing of its remembered result left it undecided (ResNet-50's warm
    compile searched for 17.9 s where the cold one took 14.1 s): timed once more, it meets the target and comes back
    without a search, reported at the second timing."""
    monkeypatch.setenv("FXPRUNE_CACHE_DIR", str(tmp_path))
    net = Net().eval()
    cold = fxprune.report(fxprune.compile(net, speedup=1.5, example_inputs=X, verify=False)).latency
    confirmed = on_confirm(monkeypatch, lambda c, i: reaching_past_1_5x(c) if i == 0 else c)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fxprune"):
        warm = fxprune.report(fxprune.compile(net, speedup=1.5, example_inputs=X, verify=False)).latency
    assert "it cannot be told from the target now (A/A noise" in caplog.text and "searching afresh" not in caplog.text
    assert len(confirmed) == 2 and warm["results_timed"] == 2 and "candidate" not in caplog.text
    assert warm["interval"][0] > 1.5 and warm["speedup"] == pytest.approx(cold["speedup"], rel=0.05)


def test_a_result_far_past_the_target_is_returned_when_a_plan_with_a_little_fewer_flops_removed_missed() -> None:
    """Speed can step with the kernels more than with the FLOPs (MobileNetV2 at batch 8: 55% of the FLOPs
    removed ran 2.9x, 53% 1.8x): a result far past the target is returned when a plan that removed at most
    ``STEP`` fewer of the FLOPs missed, with a note that says so, instead of bisecting towards plans that
    remove more FLOPs and run slower."""
    from fxprune.core.groups import Plan
    from fxprune.targets.latency import Search
    from fxprune.targets.nearer import STEP, nearer
    from fxprune.targets.trials import Trial

    a = pipeline.analyze(Net().eval(), X)
    groups = [g for g in a.deps.prunable_groups if g.width >= 32]
    def plan(keep: int) -> Plan:
        return Plan({g.id: list(range(keep * g.width // 32)) for g in groups})

    search = object.__new__(Search)
    search.a, search.goal, search.step = a, 0.5, None
    original = fake_measure([Net().eval()], (X,))[0]
    def trial(keep: int, speedup: float) -> Trial:
        c = dataclasses.replace(timing.Comparison.identical(original), ratio=1 / speedup, low=0.99 / speedup, high=1.01 / speedup, rounds=6)
        return Trial(plan(keep), c, 0.5, False)

    fast, near = trial(14, 2.9), trial(15, 1.8)  # the nearer one keeps more channels, so fewer FLOPs go
    assert 0 < search.removed(fast.plan) - search.removed(near.plan) <= STEP
    assert nearer(search, fast, [near, fast]) is fast
    (note,) = targets.latency.overshoot(fast, fast.comparison, [near, fast], search.goal, search.step)
    assert "measured 2.9x" in note and "fewer FLOPs" in note and "1.8x, short of the target" in note


def test_a_result_far_past_the_target_gives_way_to_one_between_it_and_a_lighter_plan_that_is_not_wider() -> None:
    """Plans of two budgets need not nest (MobileNetV2 at batch 8: its 54% plan kept fewer channels than its 58% one in
    one layer). The only plan that missed removes fewer FLOPs but is narrower in one group, so none is wider than the
    result, 2.9x for the 2x asked; before, the result came back at once. Now the lighter plan is timed again and
    plans between are tried: one at 2.2x comes back."""
    from fxprune.core.groups import Plan
    from fxprune.targets.latency import Search
    from fxprune.targets.nearer import nearer
    from fxprune.targets.trials import Trial

    a = pipeline.analyze(Net().eval(), X)
    one, *rest = [g for g in a.deps.prunable_groups if g.width >= 32]
    def plan(first: int, others: int) -> Plan:
        return Plan({one.id: list(range(first * one.width // 32)), **{g.id: list(range(others * g.width // 32)) for g in rest}})

    search = object.__new__(Search)
    search.a, search.goal, search.step = a, 0.5, None
    original = fake_measure([Net().eval()], (X,))[0]
    def timed(p: Plan, *_, **__) -> Trial:
        gone = search.removed(p)
        speedup = 1.6 if gone < 0.45 else 2.2 if gone < 0.6 else 2.9  # speed steps with the FLOPs removed
        after = dataclasses.replace(original, median_ms=original.median_ms / speedup, q1_ms=original.q1_ms / speedup)
        c = timing.Comparison(1 / speedup, 0.99 / speedup, 1.01 / speedup, 0.0, 6, original, after)
        return Trial(p, c, 1 - gone, False)

    def budget_plan(budget: float) -> Plan:  # the latency model's plan for a budget: its estimate is the FLOPs kept
        return min((plan(k, k) for k in range(1, 33)), key=lambda p: abs(1 - search.removed(p) - budget))

    search.trial, search.plan, search.model = timed, budget_plan, types.SimpleNamespace(total=1.0)
    fast, light = timed(plan(28, 14)), timed(plan(20, 30))  # 62% and 38% of the FLOPs removed
    assert search.removed(light.plan) < 0.45 and search.removed(fast.plan) >= 0.6 and not light.wider(fast)
    chosen = nearer(search, fast, [light, fast])
    assert chosen.comparison.speedup == pytest.approx(2.2) and search.step is None


def test_a_comparison_keeps_its_rounds_when_every_pair_of_the_original_differs_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    """For a while every two timings of the original differ by 15% (a virtual machine's 2-thread forwards at
    batch 8 do): that is the machine's noise, not a burst, so no round is dropped; before, such a
    comparison kept only the rounds that agreed by chance (3 of 60)."""
    original, candidate = Net().eval(), two_groups().eval()
    calls = {"original": 0}

    def clock(model, inputs, n, sync) -> float:
        if model is candidate:
            return 50.0
        calls["original"] += 1
        return 100.0 * (1.15 if calls["original"] % 2 == 0 else 1.0)

    monkeypatch.setattr(timing, "time_calls", clock)
    c = timing.compare(original, candidate, (X,), rounds=12, most=40, precision=0.025)
    assert c.dropped == 0 and c.rounds >= 12
    assert c.ratio == pytest.approx(50.0 / 107.5)


def test_a_timing_as_fast_as_the_goal_stops_undecided_once_more_rounds_could_not_decide(monkeypatch: pytest.MonkeyPatch) -> None:
    """A candidate whose rounds spread 10% either side of exactly 2x, against a 2x goal: no number of rounds
    decides it, so its timing stops after the fewest rounds instead of running to ``most``; the same spread
    around 2.6x still decides (meets) within them. The rule's factor is the shipped one."""
    original, candidate = Net().eval(), two_groups().eval()

    def clocked(speedup: float) -> timing.Comparison:
        spread = itertools.cycle((0.9, 1.0, 1.1, 1.05, 0.95))
        monkeypatch.setattr(timing, "time_calls", lambda model, inputs, n, sync: 100.0 if model is original else 100.0 / speedup * next(spread))
        return timing.compare(original, candidate, (X,), goal=0.5, most=20, seconds=1e9)

    at_goal = clocked(2.0)
    assert at_goal.meets(0.5) is None and at_goal.rounds < 20
    assert intervals.futile(*intervals.round_ratios([100.0] * 6, [50.0 * f for f in (0.9, 1.0, 1.1, 1.05, 0.95, 0.9)], [100.0] * 6),
                         6 + timing.PATIENCE * 14, 0.5)
    clear = clocked(2.6)
    assert clear.meets(0.5) is True and clear.rounds == timing.FEWEST


def big_maps() -> nn.Sequential:
    """Two maps of 44 MiB and 22 MiB at 1x3x1200x1200: the first over glibc malloc's 32 MiB mmap ceiling."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()


BIG = torch.randn(1, 3, 1200, 1200, generator=torch.Generator().manual_seed(0))


def test_fresh_pages_names_tensors_over_glibcs_mmap_ceiling_unless_malloc_is_tuned() -> None:
    a = pipeline.analyze(big_maps(), BIG)
    note = machine.fresh_pages(a.gm, "cpu", environ={}, libc="glibc")
    assert note is not None and note.startswith("2 tensors of a forward") and "44 MiB" in note
    assert "MALLOC_MMAP_THRESHOLD_" in note and "MALLOC_TRIM_THRESHOLD_" in note
    for environ in ({"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "1073741824"},
                    {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"},
                    {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824"}):
        assert machine.fresh_pages(a.gm, "cpu", environ=environ, libc="glibc") is None
    assert "keep every tensor in the heap" in note  # as the timings do: steady_malloc
    for environ in ({"MALLOC_MMAP_THRESHOLD_": "1073741824"}, {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1073741824"}):
        alone = machine.fresh_pages(a.gm, "cpu", environ=environ, libc="glibc")  # one threshold alone: still faults, timings too
        assert alone is not None and "sets glibc's mmap threshold alone" in alone and "in these timings too" in alone
    assert machine.fresh_pages(a.gm, "cpu", environ={}, libc="") is None  # not glibc
    assert machine.fresh_pages(a.gm, "cuda:0", environ={}, libc="glibc") is None
    small = pipeline.analyze(big_maps(), BIG[..., :600, :600])
    assert machine.fresh_pages(small.gm, "cpu", environ={}, libc="glibc") is None


class FakeLibc:
    """Records ``mallopt`` calls, as (parameter, value), and ``malloc_trim`` calls, as ("trim", pad)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("trim", pad))
        return 1


def test_every_timing_keeps_glibcs_freed_memory_in_the_heap_and_sets_the_thresholds_back_after(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    libc = FakeLibc()
    monkeypatch.setattr(timing, "_glibc", lambda: libc)
    held: list[list[tuple[int, int]]] = []
    real = timing.time_calls
    monkeypatch.setattr(timing, "time_calls", lambda *args: (held.append(list(libc.calls)), real(*args))[1])
    model, x = nn.Sequential(nn.Linear(8, 8)).eval(), torch.randn(2, 8)
    off = [(timing.M_MMAP_THRESHOLD, (1 << 31) - 1), (timing.M_TRIM_THRESHOLD, (1 << 31) - 1)]
    back = [(timing.M_MMAP_THRESHOLD, timing.MMAP_MAX), (timing.M_TRIM_THRESHOLD, 2 * timing.MMAP_MAX), ("trim", 0)]
    for timed in (lambda: timing.compare(model, model, (x,), rounds=2, most=2), lambda: measure_in_turns([model], (x,), repeat=2),
                  lambda: machine.check(model, (x,), seconds=0.01)):
        libc.calls.clear(), held.clear()
        timed()
        assert held and all(calls == off for calls in held)  # every clock reading with both thresholds past any tensor
        assert libc.calls == off + back
    libc.calls.clear()
    with timing.steady_malloc("cpu"):
        measure_in_turns([model], (x,), repeat=2)
        assert libc.calls == off  # the inner block leaves them to the outer one
    assert libc.calls == off + back
    libc.calls.clear()
    for device, environ in (("cuda:0", {}), ("cpu", {"MALLOC_TRIM_THRESHOLD_": "0"}), ("cpu", {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1"}),
                            ("cpu", {"LD_PRELOAD": "libtcmalloc.so.4"})):
        with timing.steady_malloc(device, environ):
            pass
    assert libc.calls == []  # the user's allocator settings stand


def test_a_latency_target_says_when_its_timings_include_malloc_page_faults(fake_clock: FlopClock, monkeypatch: pytest.MonkeyPatch,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(machine.platform, "libc_ver", lambda: ("glibc", "2.36"))
    with caplog.at_level(logging.WARNING, logger="fxprune"):
        pruned = fxprune.compile(big_maps(), speedup=1.5, example_inputs=BIG)
    notes = pruned.meta["fxprune"]["report"]["notes"]
    assert any(n.startswith("2 tensors of a forward are over glibc malloc's 32 MiB mmap ceiling") for n in notes)
    assert "32 MiB mmap ceiling" in caplog.text


def test_results_too_close_to_the_target_to_tell_make_the_search_prune_further(monkeypatch: pytest.MonkeyPatch) -> None:
    """Results truly 1.4-1.8x faster time, call after call, 0.6, 1 and 1.4 times their cost: intervals no
    number of rounds narrows, so near the 1.5x asked none can be told from the target, even where the
    median beats the aim (1.6x); results past 1.8x time exactly. The search aims past the noise and returns
    one of those, within 1.3x of the target. (Aiming at 1.6x, it tried less pruned plans and refused as too noisy.)"""
    monkeypatch.setattr(costmodel, "layer_ms", layer_latency)
    cycles: dict[int, itertools.cycle] = {}
    by_speedup(monkeypatch, lambda model, speedup: next(cycles.setdefault(id(model), itertools.cycle((0.6, 1.0, 1.4))))
               if 1.4 <= speedup < 1.8 else 1.0)
    net = Net().eval()
    pruned = fxprune.compile(net, speedup=1.5, example_inputs=X, verify=False, cache=False)
    truth = flop_ms(net, (X,)) / flop_ms(pruned, (X,))
    assert 1.8 <= truth <= 1.3 * 1.5, truth


def test_the_search_stops_at_a_step_the_latency_model_does_not_see() -> None:
    """Two plans the model puts 3% apart measured 1.95x and 2.87x (MobileNetV2 at batch 8, where a tensor
    brought under 32 MiB stops page-faulting): plans between time as one or the other, so the search stops
    there and the report says why the result is far past the 2x asked. A gap the estimates explain, or
    estimates too far apart to call it a step, let the search go on."""
    from fxprune.core.groups import Plan
    from fxprune.targets.trials import Trial, stepped

    original = fake_measure([Net().eval()], (X,))[0]

    def trial(estimated: float, measured: float) -> Trial:
        c = dataclasses.replace(timing.Comparison.identical(original), ratio=1 / measured, low=0.99 / measured, high=1.01 / measured, rounds=6)
        return Trial(Plan({}), c, 1 / estimated, False)

    aim = 0.5 * 0.94
    note = stepped([trial(1.90, 1.95), trial(1.96, 2.87)], aim)
    assert note is not None and "measured 1.95x" in note and "3% apart" in note and "steps between them" in note
    assert stepped([trial(1.90, 1.95), trial(1.96, 2.05)], aim) is None  # the estimates explain the gap
    assert stepped([trial(1.80, 1.95), trial(1.96, 2.87)], aim) is None  # 8% apart: the model can still place plans between
    assert stepped([trial(1.96, 2.87)], aim) is None  # nothing short of the target yet
