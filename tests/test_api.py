"""The public API's contract: untouched inputs, determinism, targets, plans, reports and errors."""

from __future__ import annotations

import json

import networkx as nx
import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import fxprune
from conftest import lively, same_state, state_copy
from fxprune.core.masks import removed_mask

X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return lively(torchvision.models.resnet18(weights=None).eval())


def test_user_model_is_never_modified(resnet: nn.Module) -> None:
    resnet.train()  # train mode: a careless forward would update BatchNorm running statistics
    state = state_copy(resnet)
    flags = [m.training for m in resnet.modules()]
    with torch.no_grad():
        resnet.eval()
        before = resnet(X)
        resnet.train()
    pruned = fxprune.compile(resnet, ratio=0.5, example_inputs=X)
    fxprune.analyze(resnet, X)
    fxprune.count_flops(resnet, X)
    assert same_state(resnet, state)
    assert [m.training for m in resnet.modules()] == flags
    resnet.eval()
    with torch.no_grad():
        assert torch.equal(resnet(X), before)
    # The result shares no storage with the user's model: training it leaves the model alone.
    ptrs = {p.data_ptr() for p in resnet.parameters()} | {b.data_ptr() for b in resnet.buffers()}
    assert not ptrs & {p.data_ptr() for p in pruned.parameters()}
    pruned.train()
    pruned(X).sum().backward()
    torch.optim.SGD(pruned.parameters(), lr=0.1).step()
    assert same_state(resnet, state)


def test_same_seed_same_result(resnet: nn.Module) -> None:
    a = fxprune.compile(resnet, ratio=0.4, example_inputs=X, selector="l1", seed=3)
    b = fxprune.compile(resnet, ratio=0.4, example_inputs=X, selector="l1", seed=3)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.meta["fxprune"]["plan"] == b.meta["fxprune"]["plan"]
    assert a.code == b.code


def test_default_example_input_is_one_224_image() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    before = fxprune.count_flops(model, torch.zeros(fxprune.DEFAULT_INPUT_SHAPE))
    pruned = fxprune.compile(model, ratio=0.3)
    assert fxprune.report(pruned).flops[0] == before


@pytest.mark.parametrize("gflops", [0.2, 0.12, 0.05])
def test_target_gflops_is_met_within_3_percent(resnet: nn.Module, gflops: float) -> None:
    pruned = fxprune.compile(resnet, target_gflops=gflops, example_inputs=X)
    after = fxprune.count_flops(pruned, X)
    assert 0.97 * gflops * 1e9 <= after <= gflops * 1e9


def test_unreachable_target_names_the_smallest_reachable(resnet: nn.Module) -> None:
    with pytest.raises(fxprune.TargetUnreachableError, match="GFLOPs") as info:
        fxprune.compile(resnet, target_gflops=0.0001, example_inputs=X)
    smallest = info.value.smallest_gflops
    assert 0 < smallest < 0.01
    pruned = fxprune.compile(resnet, target_gflops=smallest * 1.001, example_inputs=X)
    assert fxprune.count_flops(pruned, X) <= smallest * 1.001e9


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one"),
        ({"target_gflops": 1.0, "ratio": 0.5}, "exactly one"),
        ({"ratio": 1.5}, "ratio must be"),
        ({"target_gflops": -1.0}, "positive"),
        ({"ratio": 0.5, "selector": "magic"}, "unknown selector 'magic'"),
        ({"ratio": 0.5, "ignore": ["layer9"]}, "layer9"),
        ({"ratio": 0.5, "example_inputs": "cat.png"}, "example_inputs"),
    ],
)
def test_bad_arguments_get_clear_errors(resnet: nn.Module, kwargs: dict, match: str) -> None:
    kwargs.setdefault("example_inputs", X)
    with pytest.raises(fxprune.ArgumentError, match=match):
        fxprune.compile(resnet, **kwargs)


def test_wrong_input_shape_is_a_shape_error(resnet: nn.Module) -> None:
    with pytest.raises(fxprune.ShapeError, match="example_inputs"):
        fxprune.compile(resnet, ratio=0.5, example_inputs=torch.randn(1, 5, 32, 32))


class Untraceable(nn.Module):
    """Python control flow on the data: neither symbolic tracing nor torch.export captures it whole."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = self.conv1(x).relu()
        if x.mean() > 0:  # decided on the data
            y = y * 2
        return self.conv2(y)


def test_untraceable_root_prunes_as_a_copy_of_its_module_tree() -> None:
    model = Untraceable()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = fxprune.compile(model, ratio=0.5, example_inputs=X, round_to=1)
    assert type(pruned) is Untraceable and pruned.conv1.out_channels == pruned.conv2.in_channels < 16
    assert pruned.conv1.weight.shape[0] == pruned.conv1.out_channels
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "ops one run on the example inputs executes" in fxprune.report(pruned).notes[-1]
    assert pruned.meta["fxprune"]["verified"]["max_abs_error"] <= pruned.meta["fxprune"]["verified"]["tolerance"]


def test_a_model_that_cannot_run_on_its_inputs_is_a_trace_error_naming_the_line() -> None:
    class Picky(Untraceable):
        def forward(self, x):
            if x.shape[-1] != 7:
                raise ValueError("needs 7 columns")
            return super().forward(x)

    with pytest.raises(fxprune.TraceError, match=r"(?s)test_api.py:\d+: if x.shape\[-1\] != 7.*needs 7 columns"):
        fxprune.compile(Picky(), ratio=0.5, example_inputs=X)


def test_prune_with_explicit_plan(resnet: nn.Module) -> None:
    graph = fxprune.analyze(resnet, X)
    g = next(g for g in graph.groups if any(m.name == "layer2.0.conv1.weight" and m.dim == 0 for m in g.members))
    pruned = fxprune.prune(resnet, {g.id: [0, 5, 7]}, X)
    assert pruned.get_submodule("layer2.0.conv1").out_channels == 3
    torch.testing.assert_close(pruned.get_submodule("layer2.0.conv1").weight, resnet.layer2[0].conv1.weight[[0, 5, 7]])
    kept = pruned.meta["fxprune"]["kept"]
    assert kept["modules"]["layer2.0.conv2"]["in"] == [0, 5, 7]
    assert kept["modules"]["layer2.0.conv1"] == {"in": list(range(64)), "out": [0, 5, 7]}
    assert kept["modules"]["fc"]["out"] == list(range(1000))
    assert kept["parameters"]["layer2.0.bn1.running_mean"]["0"] == [0, 5, 7]
    assert kept["parameters"]["layer3.0.conv1.weight"] == {}  # untouched
    assert set(kept["parameters"]) == set(resnet.state_dict())
    json.dumps(pruned.meta["fxprune"])  # the whole record is JSON-serializable


def test_a_plan_changed_after_use_gets_its_own_removed_mask(resnet: nn.Module) -> None:
    """removed_mask remembers the last plan's mask: a plan edited in place, a mask edited by its caller
    and a plan of numpy positions each still get the mask their own positions say."""
    graph = fxprune.analyze(resnet, X)
    g = next(g for g in graph.prunable_groups if g.width > 8)

    def expected(keep: list[int]) -> torch.Tensor:
        mask = torch.zeros(graph.num_atoms, dtype=torch.bool)
        mask[g.atoms] = True
        mask[g.atoms[keep]] = False
        return mask

    plan = fxprune.Plan({g.id: [0, 2, 5]})
    removed_mask(graph, plan)[:] = True  # the caller's copy
    assert torch.equal(removed_mask(graph, plan), expected([0, 2, 5]))
    plan.keep[g.id].append(7)
    assert torch.equal(removed_mask(graph, plan), expected([0, 2, 5, 7]))
    assert torch.equal(removed_mask(graph, fxprune.Plan({g.id: np.array([1, 3])})), expected([1, 3]))
    assert not removed_mask(graph, fxprune.Plan({})).any()


def test_bad_plans_are_plan_errors(resnet: nn.Module) -> None:
    graph = fxprune.analyze(resnet, X)
    frozen = next(g for g in graph.groups if g.frozen and g.width > 1)
    prunable = graph.prunable_groups[0]
    with pytest.raises(fxprune.PlanError, match="frozen"):
        fxprune.prune(resnet, {frozen.id: [0]}, X)
    with pytest.raises(fxprune.PlanError, match="distinct positions"):
        fxprune.prune(resnet, {prunable.id: [0, prunable.width]}, X)
    with pytest.raises(fxprune.PlanError, match="groups 0"):
        fxprune.prune(resnet, {999: [0]}, X)
    with pytest.raises(fxprune.PlanError, match="must be integers"):
        fxprune.prune(resnet, {prunable.id: [0, 1.5]}, X)
    given = fxprune.prune(resnet, {prunable.id: torch.tensor([0, 2])}, X)  # integer tensors (and numpy) are positions too
    assert given.meta["fxprune"]["plan"] == {str(prunable.id): [0, 2]}
    plan = fxprune.Plan({prunable.id: [1, 2]})
    assert fxprune.Plan.from_json(plan.to_json()) == plan


def test_report_table_markdown_and_dict(resnet: nn.Module) -> None:
    pruned = fxprune.compile(resnet, ratio=0.5, example_inputs=X)
    rep = fxprune.report(pruned)
    text = str(rep)
    assert "layer1.0.conv1" in text and "total" in text and "->" in text
    assert rep.to_markdown().startswith("| layer")
    d = json.loads(json.dumps(rep.to_dict()))
    assert fxprune.Report.from_dict(d).flops == rep.flops
    conv = next(r for r in rep.rows if r.name == "layer1.0.conv1")
    assert conv.out_channels[1] < conv.out_channels[0] == 64
    assert sum(r.macs[1] for r in rep.rows) == rep.macs[1]
    # The frozen groups that cost a choice: the classes; the input's single atom is kept whatever freezes it.
    assert f"1 of {len(fxprune.analyze(resnet, X).groups)} groups frozen: model output" in rep.notes
    with pytest.raises(fxprune.ArgumentError, match="count_flops"):
        fxprune.report(resnet)


def test_analyze_exposes_groups_as_networkx_dot_and_table(resnet: nn.Module) -> None:
    graph = fxprune.analyze(resnet, X)
    g = graph.to_networkx()
    assert isinstance(g, nx.Graph) and g.number_of_nodes() > len(graph.groups)
    stream = next(gr for gr in graph.groups if any(m.name == "conv1.weight" and m.dim == 0 for m in gr.members))
    assert g.has_edge(("group", stream.id), ("member", "layer1.0.conv2.weight[0]"))
    dot = graph.to_dot()
    assert dot.startswith("graph fxprune {") and dot.rstrip().endswith("}")
    text = str(graph)
    assert "frozen: model input x" in text and "frozen: model output" in text
    assert graph.groups_of("layer1.0.conv1")


class KeepLast:
    """A custom selector: keep the highest-index channels."""

    def scores(self, graph, gm):
        return {g.id: torch.arange(g.width, dtype=torch.float64) for g in graph.prunable_groups}


def test_custom_selector_object(resnet: nn.Module) -> None:
    graph = fxprune.analyze(resnet, X)
    pruned = fxprune.compile(resnet, ratio=0.3, example_inputs=X, selector=KeepLast())
    plan = pruned.meta["fxprune"]["plan"]
    for gid, keep in plan.items():
        width = graph.groups[int(gid)].width
        assert keep == list(range(width - len(keep), width))
    with pytest.raises(fxprune.ArgumentError, match="scores"):
        fxprune.compile(resnet, ratio=0.3, example_inputs=X, selector=object())


def test_l1_keeps_the_largest_filters() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():
        model[0].weight.mul_(torch.arange(1, 9, dtype=torch.float32).view(8, 1, 1, 1) ** 2)
    pruned = fxprune.compile(model, ratio=0.45, example_inputs=X[:, :, :16, :16], selector="l1")
    kept = pruned.meta["fxprune"]["kept"]["parameters"]["0.weight"]["0"]
    assert kept == list(range(8 - len(kept), 8))


def test_strategy_object_and_keywords_give_the_same_plan(resnet: nn.Module) -> None:
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    strategy = fxprune.Strategy(selector="random", round_to=4, seed=3)
    a = fxprune.compile(resnet, ratio=0.4, example_inputs=x, strategy=strategy, verify=False)
    b = fxprune.compile(resnet, ratio=0.4, example_inputs=x, selector="random", round_to=4, seed=3, verify=False)
    c = fxprune.compile(resnet, ratio=0.4, example_inputs=x, strategy=fxprune.Strategy(selector="random"), round_to=4, seed=3, verify=False)
    assert a.meta["fxprune"]["plan"] == b.meta["fxprune"]["plan"] == c.meta["fxprune"]["plan"]
    assert a.meta["fxprune"]["strategy"] == {"selector": "random", "mode": "per_group", "min_width": 1, "round_to": 4, "equal_widths": False, "seed": 3}


def test_unknown_strategy_option_names_the_closest_one(resnet: nn.Module) -> None:
    with pytest.raises(fxprune.ArgumentError, match="did you mean round_to="):
        fxprune.compile(resnet, ratio=0.5, round_too=8)
    with pytest.raises(fxprune.ArgumentError, match="min_width must be an integer"):
        fxprune.Strategy(min_width=0)


def test_cli_backend_and_iterate_take_the_one_list_of_targets_and_options() -> None:
    import inspect

    from fxprune.backend import _OPTIONS
    from fxprune.cli import _parser
    from fxprune.targets import Target

    compile_cmd = _parser()._subparsers._group_actions[0].choices["compile"]
    flags = {a.dest for a in compile_cmd._actions}
    targets = {a.dest for group in compile_cmd._mutually_exclusive_groups for a in group._group_actions}
    assert targets == set(Target.keywords()) == {"target_gflops", "ratio", "speedup", "target_latency_ms"}
    assert {f for f in fxprune.Strategy.option_names() if "cli" in fxprune.Strategy.__dataclass_fields__[f].metadata} <= flags
    assert _OPTIONS - {"verify", "ignore"} == set(Target.keywords(measured=False)) | set(fxprune.Strategy.option_names())
    iterate = inspect.signature(fxprune.prune_iteratively).parameters
    assert {k for k in iterate if k in Target.keywords() or k in ("speedup", "target_latency_ms")} == set(Target.keywords(measured=False))
    assert set(inspect.signature(fxprune.compile).parameters) >= set(Target.keywords())
    data_free = [n for n in fxprune.SELECTORS if n not in fxprune.selection.selectors.data_driven()]
    help_text = compile_cmd.format_help().replace("\n", " ")
    assert all(name in help_text for name in fxprune.SELECTORS) and data_free[0] == "uniform"


def test_prune_iteratively_names_a_latency_target_as_such(resnet: nn.Module) -> None:
    with pytest.raises(fxprune.ArgumentError, match=r"speedup= is a latency target, which prune_iteratively does not take"):
        fxprune.prune_iteratively(resnet, speedup=1.5, steps=2, finetune=lambda m: None)


def test_report_numbers_round_to_the_next_unit() -> None:
    from fxprune.report import si

    assert [si(x) for x in (999.6e6, 123456, 12.3e9, 999, 5.2e6)] == ["1.00G", "123K", "12.3G", "999", "5.20M"]


@pytest.mark.parametrize("hidden", [640, 4352])
def test_a_weight_pruned_on_both_dims_is_the_original_at_the_kept_positions(hidden: int) -> None:
    """The middle matrix of an MLP loses rows and columns: sliced in two steps (640), or in one copy where
    its kept rows alone would pass glibc's mmap ceiling (4352: 3072 x 4352 floats, 51 MiB). Either way the
    result's weight is the original's at the kept positions, exactly: the rewrite copies, it computes nothing."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 4)).eval()
    pruned = fxprune.compile(mlp, ratio=0.5, example_inputs=torch.randn(2, 16))
    kept = pruned.meta["fxprune"]["kept"]["parameters"]["2.weight"]
    rows, cols = kept["0"], kept["1"]
    assert len(rows) < hidden and len(cols) < hidden
    assert torch.equal(pruned.get_submodule("2").weight, mlp[2].weight[rows][:, cols])
