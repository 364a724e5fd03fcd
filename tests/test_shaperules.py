"""Shape rules: a graph they cover gets the very annotations that running it gives; anything else runs."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torch.fx.passes.shape_prop import TensorMetadata

import fxprune
from fxprune.core import metakeys as keys
from fxprune.core import shaperules
from fxprune.core.fxutil import modules_of
from fxprune.passes import shapes
from fxprune.passes.capture import capture


def _plain(v):
    if isinstance(v, TensorMetadata):
        return tuple(v.shape), v.dtype
    if isinstance(v, (tuple, list)):
        return tuple(_plain(x) for x in v)
    return v


def _annotations(gm: torch.fx.GraphModule) -> dict[str, tuple]:
    return {n.name: tuple(_plain(n.meta.get(k)) for k in (keys.TENSOR_META, keys.VALUE, keys.FLOPS)) for n in gm.graph.nodes}


def _both(model: nn.Module, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, dict]:
    gm = capture(model, (x,))
    assert shaperules.infer(gm, (x,), modules_of(gm)) is not None, "the rules should cover this graph"
    shapes.propagate_shapes(gm, (x,))
    inferred = _annotations(gm)
    with monkeypatch.context() as m:
        m.setattr(shapes, "infer", lambda *a: None)
        shapes.propagate_shapes(gm, (x,))
    return inferred, _annotations(gm)


class Ops(nn.Module):
    """The rules' ops in forms the zoo's models do not all use: pools with ceil_mode and padding, 1-d and
    3-d layers, chunk with a short last piece, size arithmetic, views with -1, mean, layer norm; and ops
    without a rule (a tensor made on the input's device, softmax), which run on meta tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 10, 3, stride=2, padding=2, dilation=2)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.avg = nn.AvgPool2d(2, ceil_mode=True)
        self.conv1d = nn.Conv1d(10, 6, 3)
        self.bn1d = nn.BatchNorm1d(6)
        self.conv3d = nn.Conv3d(1, 2, (1, 3, 3), padding=(0, 1, 1))
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 5)
        self.adaptive = nn.AdaptiveAvgPool2d((None, 3))

    def forward(self, x):
        y = self.avg(self.pool(torch.relu(self.conv(x))))
        a, b, c, d = y.chunk(4, dim=1)  # 10 channels: 3, 3, 3, 1
        y = torch.cat([a, b, c, d * 2.0], 1)
        y = y + torch.arange(y.shape[1], device=y.device).view(1, -1, 1, 1).float().softmax(1)
        n, ch = y.size(0), y.size()[1]
        z = self.bn1d(self.conv1d(y.view(n, ch, -1)))
        w = self.conv3d(y.reshape(n, 1, ch, y.shape[2], -1)).flatten(1, 2)
        pooled = self.adaptive(w) + 1
        t = self.norm(z.transpose(1, 2)).mean(1)
        return self.head(t), torch.flatten(pooled, 1).mean(dim=(1,), keepdim=True), y.permute(0, 2, 3, 1).contiguous()


@pytest.mark.parametrize("name, size", [("resnet18", 64), ("mobilenet_v3_small", 64), ("shufflenet_v2_x0_5", 64), ("convnext_tiny", 64),
                                        ("densenet121", 64), ("googlenet", 64), ("vit_b_32", 224), ("swin_t", 224)])
def test_rules_annotate_a_zoo_graph_as_running_it_does(name: str, size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last two have ops without rules (attention, windows): they run on meta tensors."""
    model = torchvision.models.get_model(name, weights=None).eval()
    inferred, run = _both(model, torch.randn(2, 3, size, size), monkeypatch)
    assert inferred == run


def test_rules_annotate_every_op_they_cover_as_running_it_does(monkeypatch: pytest.MonkeyPatch) -> None:
    inferred, run = _both(Ops().eval(), torch.randn(2, 3, 23, 29), monkeypatch)
    assert inferred == run


@pytest.mark.parametrize("name, x", [("resnet18", torch.randn(1, 5, 32, 32)), ("resnet18", torch.randn(1, 3, 32, 32, dtype=torch.float64)),
                                     ("alexnet", torch.randn(1, 3, 16, 16))], ids=["channels", "dtype", "too small"])
def test_an_input_the_model_rejects_runs_the_graph_and_says_where(name: str, x: torch.Tensor) -> None:
    model = torchvision.models.get_model(name, weights=None).eval()
    gm = capture(model, (x,))
    assert shaperules.infer(gm, (x,), modules_of(gm)) is None
    with pytest.raises(fxprune.ShapeError, match="at node"):
        fxprune.analyze(model, x)


class GroupNormed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8)

    def forward(self, x):
        return self.norm(self.conv(x))


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        y = self.conv(x)
        return y.flatten()[torch.nonzero(y.flatten() > 0).flatten()]


@pytest.mark.parametrize("model", [GroupNormed(), DataDependent()], ids=["module without a rule", "shape from data"])
def test_a_graph_the_rules_cannot_cover_runs(model: nn.Module) -> None:
    x = torch.randn(1, 3, 16, 16)
    gm = capture(model, (x,))
    assert shaperules.infer(gm, (x,), modules_of(gm)) is None
    shapes.propagate_shapes(gm, (x,))
    assert all(keys.TENSOR_META in n.meta or keys.VALUE in n.meta for n in gm.graph.nodes)


def test_module_and_tensor_tables_walk_as_torch_does() -> None:
    """``fxutil.modules_of`` / ``tensors_of`` (the passes' lookups) give ``named_modules`` / ``named_parameters``
    / ``named_buffers`` in the same order, a module or parameter shared under two names listed once."""
    from fxprune.core.fxutil import modules_of, tensors_of

    shared = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    shared.add_module("again", shared[0])
    shared.add_module("empty", None)
    for root in (nn.Sequential(shared, nn.Sequential(shared[0], nn.ReLU())), torch.fx.symbolic_trace(torchvision.models.resnet18(weights=None))):
        assert list(modules_of(root).items()) == list(root.named_modules())
        assert list(tensors_of(root).items()) == list(root.named_parameters())
        assert list(tensors_of(root, "_buffers").items()) == list(root.named_buffers())
