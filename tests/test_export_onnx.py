"""Pruned models leave PyTorch intact: torch.export and ONNX (run by onnxruntime) give the same outputs."""

from __future__ import annotations

import onnxruntime
import pytest
import torch
import torchvision
from torch import nn

import fxprune
from conftest import lively

pytestmark = pytest.mark.slow

X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


class AddCat(nn.Module):
    """A residual add feeding two branches joined by a concat, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
        self.left = nn.Conv2d(16, 8, 1)
        self.right = nn.Conv2d(16, 12, 3, padding=1)
        self.head = nn.Linear(20, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.body(x))
        x = torch.cat([self.left(x), self.right(x)], dim=1)
        return self.head(x.mean((2, 3)))


MODELS = {
    "resnet18": lambda: torchvision.models.resnet18(weights=None),
    "squeezenet1_1": lambda: torchvision.models.squeezenet1_1(weights=None),
    "add_cat": AddCat,
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def exported(request: pytest.FixtureRequest) -> tuple[torch.fx.GraphModule, torch.export.ExportedProgram]:
    """A model pruned to half its FLOPs, and its ExportedProgram."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = lively(MODELS[request.param]().eval())
    pruned = fxprune.compile(model, ratio=0.5, example_inputs=X)
    assert fxprune.report(pruned).flops[1] < fxprune.report(pruned).flops[0]
    return pruned, torch.export.export(pruned, (X,))


def test_exported_program_matches_pruned_module(exported: tuple[torch.fx.GraphModule, torch.export.ExportedProgram]) -> None:
    pruned, ep = exported
    torch.testing.assert_close(ep.module()(X), pruned(X), rtol=1e-4, atol=1e-5)


def test_onnx_runtime_matches_pruned_module(exported: tuple[torch.fx.GraphModule, torch.export.ExportedProgram]) -> None:
    pruned, ep = exported
    onnx_program = torch.onnx.export(ep, dynamo=True, verbose=False)
    session = onnxruntime.InferenceSession(onnx_program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: X.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), pruned(X), rtol=1e-4, atol=1e-5)
