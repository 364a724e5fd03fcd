"""Capture: ExportedProgram input, and the fallbacks when symbolic_trace cannot trace a model."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import fxprune
from conftest import lively
from torchvision.models.shufflenetv2 import channel_shuffle as shuffle_channels

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
    assert not any(m.training for m in pruned.modules())  # for inference: ONNX export does not warn of training mode


def test_a_channel_shuffle_is_captured_as_one_op_that_runs_as_torchvision_s() -> None:
    from fxprune.core.traceable import channel_shuffle
    from fxprune.passes.capture import capture

    torch.manual_seed(0)
    model = lively(torchvision.models.shufflenet_v2_x0_5(weights=None).eval())
    gm = capture(model, (X,))
    assert sum(n.target is torch.nn.functional.channel_shuffle for n in gm.graph.nodes) == 16  # one per block
    assert not any(n.op == "call_method" and n.target == "transpose" for n in gm.graph.nodes)  # nor its ten traced ops
    assert "fxprune" not in gm.code  # the code calls torch alone
    inlined = next(n for n in gm.graph.nodes if n.target is torch.nn.functional.channel_shuffle)
    assert list(inlined.meta["nn_module_stack"])[-1] == "stage2.0"  # inside the block that calls it, for ignore=
    x = torch.randn(2, 3, 48, 48).to(memory_format=torch.channels_last)  # another batch, size and layout than traced
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)
    y = torch.randn(1, 8, 3, 3).to(memory_format=torch.channels_last)
    assert channel_shuffle(y, 2).is_contiguous()  # as torchvision's own is, whatever the input's layout


class KeywordShuffle(nn.Module):
    """torchvision's channel shuffle called by keywords, in a model of one's own."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(shuffle_channels(x=self.a(x), groups=2))


def test_a_channel_shuffle_called_by_keywords_is_inlined_too() -> None:
    model = KeywordShuffle().eval()
    pruned = fxprune.compile(model, ratio=0.5, example_inputs=X)
    assert "torch.channel_shuffle(" in pruned.code and fxprune.report(pruned).flops[1] < fxprune.report(pruned).flops[0]


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


class Convs(nn.Module):
    """Three convs; ``forward`` of a subclass makes symbolic_trace fail in one of two ways."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.act, self.b, self.c = nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 4, 1)


class LoopsOverAShape(Convs):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b(self.act(self.a(x)))
        for _ in range(y.shape[1] // 8):  # torch.export captures this
            y = torch.relu(y)
        return self.c(y)


class SizedByItsData(Convs):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c(self.b(self.act(self.a(x))))
        return y[:, :, : int((y[0, 0] > 0).sum()) // 32 + 1]  # a size from the data: only the ops one run executes


@pytest.mark.parametrize(("cls", "capture"), [(LoopsOverAShape, "torch.export"), (SizedByItsData, "the ops one run")])
def test_ignore_keeps_a_modules_channels_in_graphs_of_functions(cls: type[Convs], capture: str) -> None:
    """torch.export and ops-run graphs call functions on parameters, not modules: ``ignore=`` finds a
    module's ops by the module stack or the parameters they read, and a name that finds none is an error."""
    model = lively(cls().eval())
    pruned = fxprune.compile(model, ratio=0.4, example_inputs=X, ignore=["b"])
    notes = fxprune.report(pruned).notes
    assert any(capture in n for n in notes) and any("module b is in ignore=" in n for n in notes)
    kept = pruned.meta["fxprune"]["kept"]["parameters"]
    assert "0" not in kept["b.weight"] and len(kept["a.weight"]["0"]) < 16  # b keeps its outputs, a loses some
    if cls is SizedByItsData:
        assert pruned.get_submodule("b").out_channels == 16 and pruned.get_submodule("a").out_channels < 16
        with pytest.raises(fxprune.ArgumentError, match=r"ignore= names 'act', but no op of the captured graph belongs to it"):
            fxprune.compile(model, ratio=0.4, example_inputs=X, ignore=["act"])


def test_regions_that_export_wraps_in_grad_mode_or_autocast_are_inlined_and_keep_their_context() -> None:
    """torch.export wraps ``with torch.no_grad()`` and ``with torch.autocast(...)`` regions in higher-order
    ops (as transformers' rotary embeddings have them); their channels couple, and the region keeps its mode."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            with torch.autocast("cpu", enabled=False):
                h = torch.relu(h)
            with torch.no_grad():
                h = h * 2
            return self.b(h)

    torch.manual_seed(0)
    x = torch.randn(2, 8)
    ep = torch.export.export(Net().eval(), (x,), strict=False)
    assert any("wrap_with" in str(n.target) for n in ep.graph.nodes)
    graph = fxprune.analyze(ep, x)
    assert sorted(r for g in graph.groups for r in g.frozen) == ["model input x", "model output"]
    pruned = fxprune.compile(ep, ratio=0.4, round_to=1)
    assert pruned.get_parameter("a.weight").shape[0] < 16
    pruned(x).sum().backward()  # the no_grad region still cuts a's weights off from the loss
    assert pruned.get_parameter("a.weight").grad is None and pruned.get_parameter("b.weight").grad is not None


def test_a_hook_on_a_pruned_module_stays_on_it() -> None:
    """The rewrite copies modules with their own hook tables: a hook registered on the result reaches
    neither the user's model nor a second result."""
    model = lively(torchvision.models.resnet18(weights=None).eval())
    first, second = (fxprune.compile(model, ratio=0.5, example_inputs=X) for _ in range(2))
    seen = []
    first.get_submodule("layer1.0.conv1").register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    with torch.no_grad():
        model(X), second(X)
    assert seen == [] and not model.layer1[0].conv1._forward_hooks
    with torch.no_grad():
        first(X)
    assert seen == [first.get_submodule("layer1.0.conv1").out_channels]


def test_a_buffer_made_non_persistent_in_the_result_stays_in_the_models_state_dict() -> None:
    """The copies' sets of non-persistent buffer names are their own too: a buffer the user makes
    non-persistent in the result leaves the model's ``state_dict`` as it was."""
    model = torchvision.models.resnet18(weights=None).eval()
    before = list(model.state_dict())
    pruned = fxprune.compile(model, ratio=0.5, example_inputs=X, verify=False)
    bn = pruned.get_submodule("bn1")
    bn.register_buffer("running_mean", bn.running_mean, persistent=False)
    assert list(model.state_dict()) == before and "bn1.running_mean" not in pruned.state_dict()

