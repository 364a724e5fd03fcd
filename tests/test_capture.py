"""Capture: ExportedProgram input, and the fallbacks when symbolic_trace cannot trace a model."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import fxprune
from conftest import lively

X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_exported_program_prunes_like_the_module() -> None:
    torch.manual_seed(0)
    model = lively(torchvision.models.shufflenet_v2_x0_5(weights=None).eval())
    ep = torch.export.export(model, (X,))
    from_ep, from_module = fxprune.analyze(ep), fxprune.analyze(model, X)
    assert [g.width for g in from_ep.groups] == [g.width for g in from_module.groups]
    pruned = fxprune.compile(ep, ratio=0.5)  # the ExportedProgram's example inputs are the default
    rep = fxprune.report(pruned)
    assert rep.flops[1] <= 0.5 * rep.flops[0] and any("ExportedProgram" in n for n in rep.notes)
    assert pruned(X).shape == (1, 1000)


class ShapeDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        for _ in range(y.shape[1] // 4):  # Python over a shape: symbolic_trace cannot, torch.export can
            y = torch.relu(y)
        return self.b(y)


def test_falls_back_to_torch_export_and_says_why() -> None:
    pruned = fxprune.compile(lively(ShapeDependent().eval()), ratio=0.3, example_inputs=X)
    note = next(n for n in fxprune.report(pruned).notes if n.startswith("captured with"))
    assert "torch.export" in note and "test_capture.py" in note and "range(y.shape[1] // 4)" in note
    assert len(pruned.meta["fxprune"]["kept"]["parameters"]["a.weight"]["0"]) < 8
    with torch.no_grad():
        assert pruned(X).shape == (1, 4, 32, 32)


class TakesOneBranch(nn.Module):
    """Chooses a head from its data: one eval-mode run sees only one of them."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 1), nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        return self.a(y) if y.sum() > -1e9 else self.b(y)


def test_a_module_the_recorded_run_never_used_is_an_error() -> None:
    """Captured from one run, the pruned stem would no longer fit ``b``: refused, with ``b`` named."""
    with pytest.raises(fxprune.TraceError, match=r"did not use 1 module\(s\) with parameters: b\. .*every module runs"):
        fxprune.compile(TakesOneBranch().eval(), ratio=0.5, example_inputs=X)
