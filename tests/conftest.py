"""Shared test helpers."""

from __future__ import annotations

import pytest
import torch
from torch import nn


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


@pytest.fixture(autouse=True)
def _fixed_round_to(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """``round_to="auto"`` measures this machine; tests pin it to 1 (exact widths, no timing) and keep
    layer timings in a fresh cache directory, unless marked ``measured``."""
    monkeypatch.setenv("FXPRUNE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    if "measured" not in request.keywords:
        monkeypatch.setattr("fxprune.latency.fast_multiple", lambda *args: 1)
