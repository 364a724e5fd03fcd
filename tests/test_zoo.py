"""Every acceptance model compiles at ratio 0.5: verified, same output shape, FLOPs on target and equal
to FlopCounterMode's count on the pruned model."""

from __future__ import annotations

import pytest
import torch
import torchvision

import fxprune
from conftest import lively

pytestmark = pytest.mark.slow

MODELS = {
    "resnet18": 64, "resnet50": 64, "squeezenet1_0": 64, "squeezenet1_1": 64, "vgg16_bn": 64,
    "alexnet": 96, "densenet121": 64, "googlenet": 64, "inception_v3": 96, "mobilenet_v2": 64,
    "mobilenet_v3_small": 64, "shufflenet_v2_x0_5": 64, "efficientnet_b0": 64, "regnet_y_400mf": 64,
    "resnext50_32x4d": 64, "mnasnet0_5": 64, "convnext_tiny": 64,
}


def build(name: str) -> torch.nn.Module:
    kwargs = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    torch.manual_seed(0)
    return lively(torchvision.models.get_model(name, weights=None, **kwargs).eval())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_compile_half_flops(name: str) -> None:
    model = build(name)
    size = MODELS[name]
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    pruned = fxprune.compile(model, ratio=0.5, example_inputs=x)  # verify=True raises on mismatch
    rep = fxprune.report(pruned)
    before, after = rep.flops
    assert before == fxprune.count_flops(model, x)
    assert after == fxprune.count_flops(pruned, x), "analytic FLOPs must equal FlopCounterMode's"
    target = 0.5 * before
    assert after <= target and after >= 0.97 * target
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape
    assert rep.params[1] < rep.params[0]
    assert pruned.meta["fxprune"]["verified"]["max_abs_error"] <= pruned.meta["fxprune"]["verified"]["tolerance"]
