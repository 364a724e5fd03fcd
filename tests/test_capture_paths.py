"""One op table for both capture paths: a model captured by symbolic tracing and by torch.export gets
the same channel groups and the same frozen ones (``benchmarks/capture_paths.py`` runs the whole zoo)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from capture_paths import compare  # noqa: E402

pytestmark = pytest.mark.slow

MODELS = ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5", "squeezenet1_1", "efficientnet_b0",
          "regnet_y_400mf", "convnext_tiny", "densenet121", "googlenet", "vit_b_16", "swin_t"]


@pytest.mark.parametrize("name", MODELS)
def test_both_capture_paths_find_the_same_groups(name: str) -> None:
    (groups, frozen, reasons), (groups2, frozen2, reasons2) = compare(name)
    assert (groups2, frozen2) == (groups, frozen)
    assert reasons2 == reasons
