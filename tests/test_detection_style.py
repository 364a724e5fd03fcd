"""A one-stage detector in the style of the popular anchor-free ones (upsample + concat neck, decoupled
heads, distribution-focal-loss box decoding, Python control flow on the input's shape) prunes through the
torch.export fallback with nothing frozen but its input and outputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from conftest import lively


def cbs(i: int, o: int, k: int = 3, s: int = 1) -> nn.Sequential:
    """Conv, BatchNorm, SiLU."""
    return nn.Sequential(nn.Conv2d(i, o, k, s, k // 2, bias=False), nn.BatchNorm2d(o), nn.SiLU())


class DFL(nn.Module):
    """Distribution-focal-loss decoding: a softmax over each side's bins, then their expectation (a fixed 1x1 conv)."""

    def __init__(self, bins: int = 8) -> None:
        super().__init__()
        self.bins = bins
        self.proj = nn.Conv2d(bins, 1, 1, bias=False).requires_grad_(False)
        self.proj.weight.data[:] = torch.arange(bins, dtype=torch.float).view(1, bins, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, a = x.shape
        return self.proj(x.view(b, 4, self.bins, a).transpose(2, 1).softmax(1)).view(b, 4, a)


class Detector(nn.Module):
    """Backbone with three strides, an upsample + concat neck, box and class heads on two levels."""

    def __init__(self, classes: int = 3, bins: int = 8) -> None:
        super().__init__()
        self.stem = cbs(3, 16, 3, 2)
        self.c3 = nn.Sequential(cbs(16, 32, 3, 2), cbs(32, 32))
        self.c4 = nn.Sequential(cbs(32, 64, 3, 2), cbs(64, 64))
        self.c5 = nn.Sequential(cbs(64, 96, 3, 2), cbs(96, 96))
        self.up5 = cbs(96 + 64, 64)
        self.up4 = cbs(64 + 32, 32)
        self.box = nn.ModuleList(nn.Sequential(cbs(c, 32), nn.Conv2d(32, 4 * bins, 1)) for c in (32, 64))
        self.cls = nn.ModuleList(nn.Sequential(cbs(c, 32), nn.Conv2d(32, classes, 1)) for c in (32, 64))
        self.dfl = DFL(bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 32:  # Python control flow on a shape: symbolic tracing stops here
            x = F.pad(x, (0, 32 - x.shape[-1] % 32, 0, 32 - x.shape[-2] % 32))
        p3 = self.c3(self.stem(x))
        p4 = self.c4(p3)
        p5 = self.c5(p4)
        n4 = self.up5(torch.cat([F.interpolate(p5, scale_factor=2.0, mode="nearest"), p4], 1))
        n3 = self.up4(torch.cat([F.interpolate(n4, scale_factor=2.0, mode="nearest"), p3], 1))
        levels = [torch.cat([box(f), cls(f)], 1).flatten(2) for f, box, cls in zip((n3, n4), self.box, self.cls)]
        y = torch.cat(levels, 2)
        reg, scores = y.split([4 * self.dfl.bins, y.shape[1] - 4 * self.dfl.bins], 1)
        return torch.cat([self.dfl(reg), scores.sigmoid()], 1)


def test_one_stage_detector_prunes_through_the_export_fallback() -> None:
    model = lively(Detector().eval())
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    graph = fxprune.analyze(model, x)
    frozen = {g.id: g.frozen for g in graph.groups if g.frozen}
    outputs = [g for g in graph.groups if g.frozen and any(m.name.startswith(("cls.0.1", "box.0.1", "dfl")) for m in g.members)]
    assert len(frozen) == 1 + len(outputs)  # the image, and the predictions: class scores, box bins, the bin decoder
    assert len(graph.prunable_groups) == 13  # backbone, neck and both heads' hidden layers
    small = fxprune.compile(model, ratio=0.5, example_inputs=x)
    report = fxprune.report(small)
    assert any("captured with torch.export" in note for note in report.notes)
    assert report.flops[1] <= 0.5 * report.flops[0]
    with torch.no_grad():
        assert small(x).shape == model(x).shape


class Thresholded(nn.Module):
    """Keeps the positions of two heads whose best score passes a threshold, concatenated, as a
    detector's postprocessing does; on the example input no position passes."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.p1, self.p2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 1), nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.stem(x).relu()
        kept = []
        for head in (self.p1, self.p2):
            s = head(f).flatten(2).transpose(1, 2).reshape(-1, 4)
            kept.append(s[s.amax(1) > 1e9])
        return torch.cat(kept)


def test_no_detections_on_the_example_input() -> None:
    """Empty tensors through the glue (a concatenation of nothing) still couple, prune and verify."""
    model, x = Thresholded().eval(), torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    small = fxprune.compile(model, ratio=0.5, example_inputs=x)
    assert fxprune.count_flops(small, (x,)) <= 0.55 * fxprune.count_flops(model, (x,))
    with torch.no_grad():
        assert small(x).shape == (0, 4)
