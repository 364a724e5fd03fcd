"""Pruned models under torch.compile (inductor, CPU), and the ``fxprune`` torch.compile backend."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import fxprune
from conftest import lively

pytestmark = pytest.mark.slow

X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return lively(torchvision.models.get_model(name, weights=None).eval())


@pytest.mark.parametrize("name", ["resnet18", "squeezenet1_1", "mobilenet_v3_small", "shufflenet_v2_x0_5", "efficientnet_b0"])
def test_pruned_model_compiles_with_inductor(name: str) -> None:
    pruned = fxprune.compile(build(name), ratio=0.5, example_inputs=X)
    torch._dynamo.reset()
    compiled = torch.compile(pruned)
    with torch.no_grad():
        torch.testing.assert_close(compiled(X), pruned(X), rtol=1e-4, atol=1e-5)


def test_backend_prunes_the_captured_graph() -> None:
    model = build("resnet18")
    torch._dynamo.reset()
    fast = torch.compile(model, backend="fxprune", options={"ratio": 0.5})
    with torch.inference_mode():
        got = fast(X)
        want = fxprune.compile(model, ratio=0.5, example_inputs=X)(X)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_backend_refuses_training() -> None:
    model = build("resnet18").train()
    torch._dynamo.reset()
    with pytest.raises(Exception, match="fxprune backend prunes for inference"):
        torch.compile(model, backend="fxprune", options={"ratio": 0.5})(X)
    model.eval()
    torch._dynamo.reset()
    with pytest.raises(Exception, match="unknown option"):
        with torch.no_grad():
            torch.compile(model, backend="fxprune", options={"ratios": 0.5})(X)
