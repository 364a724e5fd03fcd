"""The pruned model's code reaches submodules through ``_modules`` (fxprune/codegen.py)."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torchvision
from torch import nn

import fxprune
from fxprune.core.codegen import DirectGraphModule, direct_access, fx_code


@contextmanager
def module_lookups() -> Iterator[list[str]]:
    """The names that ``nn.Module.__getattr__`` resolves to a submodule while the block runs."""
    found: list[str] = []
    lookup = nn.Module.__getattr__

    def counting(self: nn.Module, name: str):  # noqa: ANN202 - nn.Module's own signature
        value = lookup(self, name)
        if isinstance(value, nn.Module):
            found.append(name)
        return value

    nn.Module.__getattr__ = counting
    try:
        yield found
    finally:
        nn.Module.__getattr__ = lookup


@pytest.fixture(scope="module")
def pruned() -> torch.fx.GraphModule:
    model = torchvision.models.resnet18(weights=None).eval()
    return fxprune.compile(model, example_inputs=torch.randn(1, 3, 64, 64), ratio=0.5)


def test_the_forward_looks_up_no_submodule_by_attribute(pruned: torch.fx.GraphModule) -> None:
    x = torch.randn(1, 3, 64, 64)
    plain = fx_code(pruned)
    with torch.no_grad(), module_lookups() as before:
        expected = plain(x)
    with torch.no_grad(), module_lookups() as after:
        got = pruned(x)
    assert len(before) >= 60  # layer1.0.conv1 and the like: one lookup per step of each path
    assert after == []
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)  # the same modules, in the same order
    assert "self._modules['layer1']._modules['0']._modules['conv1'](" in pruned.code


def test_a_replaced_or_deleted_submodule_is_seen(pruned: torch.fx.GraphModule) -> None:
    gm = copy.deepcopy(pruned)
    x = torch.randn(2, 3, 64, 64)
    block = gm.get_submodule("layer4.1")
    block.conv2, block.bn2 = nn.Identity(), nn.Identity()
    with torch.no_grad():
        assert not torch.allclose(gm(x), pruned(x), atol=1e-3)
    del gm.fc
    with pytest.raises(KeyError, match="fc"):
        gm(x)


def test_deepcopy_keeps_the_code_and_torch_export_runs_it(pruned: torch.fx.GraphModule) -> None:
    x = torch.randn(1, 3, 64, 64)
    copied = copy.deepcopy(pruned)
    assert copied.code == pruned.code
    ep = torch.export.export(pruned, (x,))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), pruned(x), rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_torch_jit_script_compiles_a_copy_with_fx_code(pruned: torch.fx.GraphModule) -> None:
    x = torch.randn(1, 3, 64, 64)
    scripted = torch.jit.script(copy.deepcopy(pruned))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), pruned(x), rtol=1e-4, atol=1e-4)
    assert "_modules" in pruned.code  # the model itself keeps its code


def test_a_loaded_model_reads_its_tensors_through_modules(pruned: torch.fx.GraphModule, tmp_path) -> None:
    x = torch.randn(1, 3, 64, 64)
    fxprune.save(pruned, tmp_path / "m.fxp")
    loaded = fxprune.load(tmp_path / "m.fxp")
    assert "self._modules['layer1']._modules['0']._modules['conv1'].weight" in loaded.code
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), pruned(x), rtol=1e-4, atol=1e-4)


def test_a_model_pickled_with_torch_save_runs_and_report_says_what_keeps_the_record(pruned: torch.fx.GraphModule, tmp_path) -> None:
    x = torch.randn(1, 3, 64, 64)
    torch.save(pruned, tmp_path / "m.pt")
    back = torch.load(tmp_path / "m.pt", weights_only=False)  # FX re-traces the pickled code: a plain GraphModule
    with torch.no_grad():
        torch.testing.assert_close(back(x), pruned(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(fxprune.ArgumentError, match="torch.save comes back without it; fxprune.save and fxprune.load keep it"):
        fxprune.report(back)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.branch = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.branch(inputs["a"]) * self.scale, inputs["b"] + 1


def test_an_exported_graph_keeps_its_input_and_output_structure() -> None:
    inputs = {"a": torch.randn(1, 3, 8, 8), "b": torch.randn(4)}
    gm = torch.export.export(TwoInputs(), ({"a": inputs["a"], "b": inputs["b"]},)).module()
    expected = gm(inputs)
    direct_access(gm.graph)
    gm.recompile()
    direct_access(gm.graph)  # a second call changes nothing
    got = gm(inputs)
    assert isinstance(got, tuple) and len(got) == 2
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


class Heads(nn.Module):
    """A reshape whose literal follows the pruned width: the rewrite edits that node."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).reshape(x.shape[0], 16, -1)
        return self.out(y.reshape(x.shape[0], 16, 8, 8))


def test_a_rewrite_that_edits_no_node_keeps_the_captured_code_and_an_edit_recompiles_its_own() -> None:
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    a = fxprune.pipeline.analyze(model, x)
    first, second = (fxprune.passes.rewrite.rewrite(a.gm, a.deps, fxprune.Plan({1: list(range(k))})) for k in (8, 16))
    assert type(first).forward is type(a.gm).forward is type(second).forward  # compiled once, at capture
    assert first.code == first.graph.python_code("self").src == a.gm.code
    with torch.no_grad():
        expected = first(x)
        out = next(n for n in first.graph.nodes if n.op == "output")
        with first.graph.inserting_before(out):
            out.args = (first.graph.call_function(torch.mul, (out.args[0], 2.0)),)
        first.recompile()
        torch.testing.assert_close(first(x), 2 * expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.gm(x), model(x), rtol=1e-5, atol=1e-6)  # the captured module and the other result
        assert "torch.mul" not in second.code and type(second).forward is type(a.gm).forward


def test_a_rewrite_that_edits_a_node_compiles_its_own_code() -> None:
    x = torch.randn(1, 3, 8, 8)
    a = fxprune.pipeline.analyze(Heads().eval(), x)
    assert {p.kind for p in a.deps.patches} & {fxprune.core.groups.PatchKind.ARG}
    gid = next(g.id for g in a.deps.prunable_groups if g.width == 16)
    pruned = fxprune.passes.rewrite.rewrite(a.gm, a.deps, fxprune.Plan({gid: list(range(8))}))
    assert type(pruned).forward is not type(a.gm).forward
    assert pruned.code == pruned.graph.python_code("self").src != a.gm.code
    assert pruned(x).shape == (1, 4, 8, 8)


def test_an_edited_rewrite_emits_only_the_edited_lines_anew_and_runs_as_fx_code() -> None:
    model = torchvision.models.shufflenet_v2_x1_0(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    captured = fxprune.pipeline.analyze(model, x).gm.code
    pruned = fxprune.compile(model, example_inputs=x, ratio=0.5, verify=False)
    fresh = pruned.graph.python_code("self").src

    def without_deletes(src: str) -> list[str]:
        return [re.sub(r";  (?:\w+ = )+None$", "", line) for line in src.split("\n")]

    changed = [new for old, new in zip(captured.split("\n"), pruned.code.split("\n"), strict=True) if new != old]
    assert changed and all(".split([" in line for line in changed)  # the shuffles' chunks, now splits of the pruned sizes
    assert without_deletes(pruned.code) == without_deletes(fresh)
    with torch.no_grad():
        expected = pruned(x)
        pruned.recompile()
        assert pruned.code == fresh
        torch.testing.assert_close(pruned(x), expected, rtol=1e-5, atol=1e-6)


def test_a_dict_of_targets_builds_the_tree_graph_module_builds() -> None:
    """``DirectGraphModule`` places a dict's targets itself: the same tree as ``GraphModule`` builds, shallower
    targets first (a module and a parameter inside it), a tensor that is not a parameter as a buffer, new
    containers as plain modules, and the same objects at every name."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    block = graph.call_module("stage.block", (x,))
    bias = graph.get_attr("stage.block.bias")
    scale = graph.get_attr("head.scale")
    graph.output(graph.call_function(torch.mul, (graph.call_function(torch.add, (block, bias)), scale)))
    linear = nn.Linear(4, 4)
    attrs = {"stage.block": linear, "stage.block.bias": linear.bias, "head.scale": torch.tensor(2.0)}
    ours, theirs = DirectGraphModule(attrs, copy.deepcopy(graph)), torch.fx.GraphModule(attrs, copy.deepcopy(graph))
    for table in ("named_modules", "named_parameters", "named_buffers"):
        got, want = dict(getattr(ours, table)()), dict(getattr(theirs, table)())
        assert got.keys() == want.keys() and all(type(got[k]) is type(want[k]) for k in got if k), table
        assert all(got[k] is want[k] for k in got if k in attrs or table != "named_modules"), table  # containers are each one's own
    assert dict(ours.named_modules()).keys() == {"", "stage", "stage.block", "head"}
    x = torch.randn(2, 4)
    torch.testing.assert_close(ours(x), theirs(x))  # the same modules and ops: within float32's default tolerance
