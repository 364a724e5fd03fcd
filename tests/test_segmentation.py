"""Segmenters prune whole: torchvision's FCN, DeepLabV3 and LR-ASPP at half their FLOPs verify and keep
their output shapes (the detection and segmentation claims themselves are not re-tested here)."""

from __future__ import annotations

import pytest
import torch
import torchvision

import fxprune
from conftest import lively

pytestmark = pytest.mark.slow

MODELS = ["fcn_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"]


@pytest.mark.parametrize("name", MODELS)
def test_segmenter_prunes_whole(name: str) -> None:
    torch.manual_seed(0)
    model = lively(torchvision.models.get_model(name, weights=None, weights_backbone=None).eval())
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    graph = fxprune.analyze(model, x)
    assert len([g for g in graph.groups if g.frozen]) == 2  # the image and the class scores
    pruned = fxprune.compile(model, ratio=0.5, example_inputs=x)
    before, after = fxprune.report(pruned).flops
    assert after <= 0.5 * before
    with torch.no_grad():
        assert pruned(x)["out"].shape == model(x)["out"].shape
