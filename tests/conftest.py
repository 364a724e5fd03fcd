"""Shared test helpers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.latency.timing import Latency, Setting


def lively(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every normalization layer random statistics and affine parameters, in place.

    Random-init torchvision models in eval mode often produce outputs that barely depend on most
    channels; with this every channel matters, so a wrong rewrite shows up in the outputs.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) * 1.5 + 0.5)
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)):
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    return model


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


def _up(n: int, step: int = 8) -> int:
    return -(-n // step) * step


def stepped_ms(layer: nn.Module, x: torch.Tensor) -> float:
    """A deterministic stand-in for a layer's measured milliseconds: its MACs with every channel count
    rounded up to a multiple of 8, as kernels that work in blocks of 8 channels take (1 ms per 10 MMACs,
    plus 0.01 ms a call)."""
    spatial = x[0, 0].numel() if x.dim() > 2 else 1
    if isinstance(layer, nn.Linear):
        macs = x.numel() // x.shape[-1] * _up(layer.in_features) * _up(layer.out_features)
    elif isinstance(layer, nn.modules.conv._ConvNd):
        per_group = layer.in_channels // layer.groups
        kernel = math.prod(layer.kernel_size) // math.prod(layer.stride)
        macs = spatial * kernel * (_up(layer.out_channels) * (per_group if layer.groups > 1 else _up(per_group)))
    else:
        macs = x.numel()
    return 1e-7 * macs + 0.01


def fake_layer_ms(layer: nn.Module, x: torch.Tensor) -> Latency:
    ms = stepped_ms(layer, x)
    return Latency(ms, ms, ms, 9, int(x.shape[0]), Setting.of(layer, (x,)), ms, ms)


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


X16 = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def two_groups() -> nn.Sequential:
    """conv0 (3 -> 16, 5x5) -> relu -> conv2 (16 -> 16, 1x1) -> relu -> conv4 (16 -> 4, 1x1).

    Group A (conv0's outputs) costs 256 * (75 + 16) = 23296 MACs per channel at 16x16, group B
    (conv2's outputs) 256 * (16 + 4) = 5120.
    """
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 5, padding=2, bias=False), nn.ReLU(), nn.Conv2d(16, 16, 1, bias=False), nn.ReLU(),
        nn.Conv2d(16, 4, 1, bias=False),
    ).eval()


def width(pruned: torch.fx.GraphModule, module: str) -> int:
    return pruned.get_submodule(module).out_channels


FORWARDS: list[int] = []


@torch.fx.wrap
def count_forward(x: torch.Tensor) -> torch.Tensor:
    """Stays one call in the traced graph, so every forward of every rewritten model is counted."""
    FORWARDS.append(x.shape[0])
    return x


class Net(nn.Module):
    """Residual stream plus a fire-style concat: the couplings that make gradual pruning non-trivial."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.res = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(), nn.Conv2d(24, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.squeeze = nn.Conv2d(16, 8, 1)
        self.e1 = nn.Conv2d(8, 16, 1)
        self.e3 = nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = count_forward(x)
        x = self.stem(x)
        x = F.relu(x + self.res(x))
        s = F.relu(self.squeeze(F.max_pool2d(x, 2)))
        x = torch.cat([F.relu(self.e1(s)), F.relu(self.e3(s))], 1)
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def quadrant_data(n: int, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images whose class is the quadrant that is brighter: learnable in a few SGD steps."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=gen)
    x = torch.randn(n, 1, 16, 16, generator=gen) * 0.3
    for i, c in enumerate(y.tolist()):
        r, col = divmod(c % 4, 2)
        x[i, 0, 8 * r:8 * r + 8, 8 * col:8 * col + 8] += 2.0 + c // 4
    return x, y


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that time this machine for real belong to the slow lane."""
    for item in items:
        if "measured" in item.keywords:
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> FlopClock:
    """Every timing, of whole models and of layers, from ``FlopClock``: 1 ms per MFLOP."""
    clock = FlopClock()
    monkeypatch.setattr("fxprune.latency.timing.time_calls", clock)
    monkeypatch.setattr("fxprune.latency.costmodel.layer_ms", layer_latency)
    return clock


@pytest.fixture(autouse=True)
def _fake_layer_clock(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Layer timings (the latency model and ``round_to="auto"``, which runs by default) come from
    ``stepped_ms`` instead of this machine's clock, and are kept in a fresh cache directory; tests marked
    ``measured`` time for real. The rule that acts on the timings is the shipped one."""
    monkeypatch.setenv("FXPRUNE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    if "measured" not in request.keywords:
        monkeypatch.setattr("fxprune.latency.costmodel.layer_ms", fake_layer_ms)
