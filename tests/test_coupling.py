"""Coupling on small hand-built models, one per kind of coupling real models have.

Each model is pruned with verify=True (the pruned model must equal its masked original) and the test
then checks what the coupling says about the structure.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fxprune
from conftest import lively
from fxprune.passes.couple import RuleError, Unsupported, driver, layout

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def compile_ok(model: nn.Module, x: torch.Tensor = X, ratio: float = 0.4, **kw) -> torch.fx.GraphModule:
    lively(model.eval())
    pruned = fxprune.compile(model, ratio=ratio, example_inputs=x, **kw)
    with torch.no_grad():
        ref, out = model(x), pruned(x)
    torch.testing.assert_close(torch.tensor(_shape(out)), torch.tensor(_shape(ref)))
    rep = fxprune.report(pruned)
    assert rep.flops[1] <= (1 - ratio) * rep.flops[0] * 1.0000001
    return pruned


def _shape(out):
    if isinstance(out, dict):
        return [list(v.shape) for v in out.values()]
    if isinstance(out, (tuple, list)):
        return [list(v.shape) for v in out]
    return list(out.shape)


def group_with(model: nn.Module, name: str, dim: int = 0, x: torch.Tensor = X) -> fxprune.Group:
    graph = fxprune.analyze(model, x)
    return next(g for g in graph.groups if any(m.name == name and m.dim == dim for m in g.members))


def member_names(group: fxprune.Group) -> set[str]:
    return {f"{m.name}[{m.dim}]" for m in group.members}


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.stem(x)
        return self.head(F.relu(self.bn(self.a(y))) + y)


def test_residual_add_ties_both_producers() -> None:
    g = group_with(Residual(), "stem.weight")
    assert {"stem.weight[0]", "a.weight[0]", "bn.weight[0]", "a.weight[1]", "head.weight[1]"} <= member_names(g)
    assert g.prunable and g.width == 8
    compile_ok(Residual())


class Shuffle(nn.Module):
    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.c = nn.Conv2d(8, 4, 1)
        self.fused = fused

    def forward(self, x):
        y = self.a(x)
        if self.fused:
            y = F.channel_shuffle(y, 2)
        else:
            n, c, h, w = y.size()
            y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        return self.c(self.b(y))


@pytest.mark.parametrize("fused", [False, True])
def test_channel_shuffle_pairs_channels_across_halves(fused: bool) -> None:
    g = group_with(Shuffle(fused), "a.weight")
    assert g.prunable and g.width == 4  # channel j and j + 4 can only go together
    compile_ok(Shuffle(fused))


class PermuteFlatten(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(self.conv(x).permute(0, 2, 3, 1).flatten(1))


def test_permute_flatten_linear_slices_interleaved_features() -> None:
    pruned = compile_ok(PermuteFlatten(), ratio=0.3)
    kept = pruned.meta["fxprune"]["kept"]["parameters"]
    channels = kept["conv.weight"]["0"]
    want = [pos * 6 + c for pos in range(16) for c in channels]  # channels-last: channel is the fastest index
    assert kept["fc.weight"]["1"] == want


class SplitCat(nn.Module):
    def __init__(self, literal: bool) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 12, 1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.c = nn.Conv2d(12, 4, 1)
        self.literal = literal

    def forward(self, x):
        y = self.a(x)
        p, q = torch.split(y, [4, 8], dim=1) if self.literal else (y[:, :4], y[:, 4:])
        return self.c(torch.cat([self.b(p), q], 1))


@pytest.mark.parametrize("literal", [True, False])
def test_split_and_slices_follow_pruned_sizes(literal: bool) -> None:
    compile_ok(SplitCat(literal), ratio=0.5)


class EllipsisSlice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 8)
        self.b = nn.Linear(4, 5)

    def forward(self, x):
        return self.b(self.a(x.permute(0, 2, 3, 1))[..., 2:6])


def test_slice_after_an_ellipsis_is_reindexed() -> None:
    pruned = compile_ok(EllipsisSlice(), ratio=0.3)
    assert pruned.a.out_features < 8


class SE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.squeeze = nn.Conv2d(8, 2, 1)
        self.expand = nn.Conv2d(2, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        s = torch.sigmoid(self.expand(F.relu(self.squeeze(F.adaptive_avg_pool2d(y, 1)))))
        return self.head(y * s)


def test_se_gate_joins_the_stream() -> None:
    g = group_with(SE(), "conv.weight")
    assert {"expand.weight[0]", "squeeze.weight[1]", "head.weight[1]"} <= member_names(g)
    compile_ok(SE())


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.block = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.stem(x)
        return self.head(self.block(F.relu(self.block(y))))


def test_module_called_twice() -> None:
    g = group_with(Shared(), "block.weight")  # its output feeds itself: one group with the stem
    assert "stem.weight[0]" in member_names(g)
    compile_ok(Shared())


class MultiOut(nn.Module):
    def __init__(self, as_dict: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.cls = nn.Conv2d(8, 5, 1)
        self.box = nn.Conv2d(8, 4, 1)
        self.as_dict = as_dict

    def forward(self, x):
        y = self.body(x)
        if self.as_dict:
            return {"cls": self.cls(y), "box": self.box(y)}
        return self.cls(y), self.box(y)


@pytest.mark.parametrize("as_dict", [False, True])
def test_tuple_and_dict_outputs_keep_their_channels(as_dict: bool) -> None:
    pruned = compile_ok(MultiOut(as_dict))
    out = pruned(X)
    assert isinstance(out, dict) == as_dict


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.b1 = nn.Parameter(torch.randn(8) * 0.1)
        self.scale = nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.register_buffer("shift", torch.randn(1, 8, 1, 1) * 0.1)
        self.w2 = nn.Parameter(torch.randn(5, 8) * 0.3)

    def forward(self, x):
        y = F.relu(F.conv2d(x, self.w1, self.b1, padding=1) * self.scale + self.shift)
        return F.linear(y.mean((2, 3)), self.w2)


def test_functional_ops_on_parameters_and_per_channel_buffers() -> None:
    g = group_with(Functional(), "w1")
    assert {"w1[0]", "b1[0]", "scale[0]", "shift[1]", "w2[1]"} <= member_names(g)
    pruned = compile_ok(Functional())
    assert pruned.w1.shape[0] == pruned.scale.shape[0] == pruned.shift.shape[1] == pruned.w2.shape[1] < 8


class HandLinear(nn.Module):
    """A linear layer written out, as custom layers often are: ``x @ weight.T`` (``how="T"``), ``weight.t()``,
    ``transpose(0, 1)``, or a weight stored (in, out) and read as it is."""

    def __init__(self, n_in: int, n_out: int, how: str) -> None:
        super().__init__()
        self.how = how
        shape = (n_in, n_out) if how == "stored" else (n_out, n_in)
        self.weight = nn.Parameter(torch.randn(*shape) / n_in**0.5)
        self.bias = nn.Parameter(torch.randn(n_out))

    def forward(self, x):
        w = {"T": lambda: self.weight.T, "t": lambda: self.weight.t(), "transpose": lambda: self.weight.transpose(0, 1),
             "stored": lambda: self.weight}[self.how]()
        return torch.matmul(x, w) + self.bias


class HandMLP(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.a, self.b, self.c = HandLinear(12, 32, how), HandLinear(32, 32, how), HandLinear(32, 5, how)

    def forward(self, x):
        return self.c(F.gelu(self.b(F.relu(self.a(x)))))


@pytest.mark.parametrize("how", ["T", "t", "transpose", "stored"])
@pytest.mark.parametrize("export", [False, True], ids=["traced", "exported"])
def test_a_product_with_a_weight_parameter_is_a_linear_layer(how: str, export: bool) -> None:
    """``x @ self.weight.T + self.bias`` couples as ``nn.Linear`` does, traced (``getattr(w, "T")``) or exported
    (aten ``numpy_T``, ``t``, ``transpose``): the weight's rows with the bias and the next weight's columns."""
    x = torch.randn(3, 7, 12)
    model = HandMLP(how).eval()
    given = torch.export.export(model, (x,)) if export else model
    g = group_with(given, "a.weight", 1 if how == "stored" else 0, x)
    assert member_names(g) == ({"a.weight[1]", "a.bias[0]", "b.weight[0]"} if how == "stored" else {"a.weight[0]", "a.bias[0]", "b.weight[1]"})
    pruned = fxprune.compile(given, ratio=0.5, example_inputs=x)  # verified against the masked original
    assert pruned.a.weight.shape[1 if how == "stored" else 0] < 32
    assert pruned(torch.randn(2, 7, 12)).shape == (2, 7, 5)


class Elementwise(nn.Module):
    """A hidden layer through ``torch.max`` with a 0-d tensor (XGLM clamps its attention scores so: aten ``max.other``)
    or through ``torch.reciprocal``."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.a, self.b = nn.Linear(12, 32), nn.Linear(32, 5)

    def forward(self, x):
        h = self.a(x)
        return self.b(torch.max(h, torch.tensor(-1.0)) if self.op == "max" else torch.reciprocal(h.abs() + 1))


@pytest.mark.parametrize("op", ["max", "reciprocal"])
def test_elementwise_ops_of_an_exported_graph_pass_channels_through(op: str) -> None:
    """aten ``max.other`` (the two-tensor ``torch.max``) maps to ``torch.maximum``, not to the ``max`` reduction, whose
    overloads share its name, and ``reciprocal`` is elementwise: the channels they pass stay prunable (XGLM's heads were
    frozen by the first, "not understood")."""
    x = torch.randn(3, 7, 12)
    given = torch.export.export(Elementwise(op).eval(), (x,))
    g = group_with(given, "a.weight", 0, x)
    assert member_names(g) == {"a.weight[0]", "a.bias[0]", "b.weight[1]"} and not g.frozen
    assert fxprune.compile(given, ratio=0.5, example_inputs=x).a.weight.shape[0] < 32


class Dims(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        conv = {"1d": nn.Conv1d, "3d": nn.Conv3d}.get(kind, nn.Conv2d)
        self.kind = kind
        self.a = conv(3, 8, 3, padding=1)
        self.b = nn.ConvTranspose2d(8, 8, 2, stride=2) if kind == "transpose" else conv(8, 8, 3, padding=1)
        self.c = conv(8, 4, 1)

    def forward(self, x):
        if self.kind == "1d":
            x = x.flatten(2)
        elif self.kind == "3d":
            x = x.unsqueeze(2).expand(-1, -1, 4, -1, -1)
        return self.c(F.relu(self.b(F.relu(self.a(x)))))


@pytest.mark.parametrize("kind", ["1d", "3d", "transpose"])
def test_conv1d_conv3d_conv_transpose(kind: str) -> None:
    pruned = compile_ok(Dims(kind))
    assert pruned.get_submodule("b").weight.shape[1 if kind == "transpose" else 0] < 8


class Norms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.prelu = nn.PReLU(8)
        self.gn = nn.GroupNorm(2, 8)
        self.inorm = nn.InstanceNorm2d(8, affine=True, track_running_stats=True)
        self.b = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8)  # depthwise with multiplier 2
        self.c = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = self.inorm(self.gn(self.prelu(self.a(x))))
        return self.c(self.dw(self.b(y)))


def test_prelu_groupnorm_instancenorm_grouped_and_depthwise() -> None:
    model = lively(Norms().eval())
    graph = fxprune.analyze(model, X)
    stream = group_with(model, "a.weight")
    assert stream.width == 2  # grouped conv (4 groups) and GroupNorm (2 groups) tie channels in fours
    plan = {g.id: list(range(g.width // 2)) for g in graph.prunable_groups}
    pruned = fxprune.prune(model, plan, X)
    gn, b, dw = pruned.get_submodule("gn"), pruned.get_submodule("b"), pruned.get_submodule("dw")
    assert gn.num_groups == 2 and gn.num_channels == gn.weight.numel() < 8
    assert b.groups == 4 and b.in_channels % 4 == 0 and b.out_channels % 4 == 0
    assert dw.groups == dw.in_channels and dw.out_channels == 2 * dw.in_channels
    notes = fxprune.report(pruned).notes
    assert any("gn" in n and "statistics" in n for n in notes)
    assert graph.masked_norms == ("gn",)  # the oracle recomputes its statistics over the kept channels


def test_layernorm_over_channels_convnext_block() -> None:
    torch.manual_seed(0)
    block = torchvision.models.convnext.CNBlock(16, layer_scale=0.5, stochastic_depth_prob=0.1)
    model = nn.Sequential(nn.Conv2d(3, 16, 1), block, nn.Conv2d(16, 4, 1))
    pruned = compile_ok(model, ratio=0.3)
    ln = pruned.get_submodule("1.block.2")
    assert ln.normalized_shape[0] == ln.weight.numel()


class Unknown(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c(torch.cumsum(self.a(x), 1) + self.b(self.a(x)))


def test_unknown_op_freezes_with_reason() -> None:
    g = group_with(Unknown(), "a.weight")
    assert not g.prunable and any("cumsum" in r for r in g.frozen)
    inner = group_with(Unknown(), "b.weight")
    assert inner.frozen  # b's output is added to cumsum's output
    assert "cumsum" in str(fxprune.analyze(Unknown(), X))


def test_a_failing_rule_is_a_bug_not_a_frozen_group(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(s, node, args, kwargs):
        return 1 / 0

    monkeypatch.setitem(driver.RULES, operator.add, broken)
    with pytest.raises(RuleError, match="broken") as info:
        fxprune.analyze(Residual(), X)
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_an_unsupported_use_freezes_with_its_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(s, node, args, kwargs):
        raise Unsupported(f"no adds here ({node.name})")

    monkeypatch.setitem(driver.RULES, operator.add, refuse)
    graph = fxprune.analyze(Residual(), X)
    stream = next(g for g in graph.groups if any(m.name == "stem.weight" and m.dim == 0 for m in g.members))
    assert not stream.prunable and stream.frozen == ("no adds here (add)",)


class FourWays(nn.Module):
    """Four convs summed: each channel's atom joins four producers' labels."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3, 8, 3, padding=1) for _ in range(4))
        self.tail = nn.Conv2d(8, 4, 1)
        self.other = nn.Conv2d(3, 8, 1)

    def forward(self, x):
        return self.tail(sum(conv(x) for conv in self.convs) + self.other(x)), self.other(x)


def test_a_group_keeps_the_first_three_reasons_that_froze_its_labels_in_order() -> None:
    graph = fxprune.analyze(FourWays(), X, ignore=["convs.3", "convs.1", "convs.2", "convs.0"])
    summed = next(g for g in graph.groups if any(m.name == "convs.0.weight" and m.dim == 0 for m in g.members))
    assert summed.frozen == tuple(f"module convs.{i} is in ignore=" for i in range(3))  # in graph order, the fourth left out
    assert not summed.prunable and summed.width == 8
    assert {m.name for m in summed.members} >= {f"convs.{i}.weight" for i in range(4)} | {"other.weight"}


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        if y.sum() > 0:  # data-dependent: cannot be traced symbolically
            y = y * 2
        return self.b(y)


class Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Conv2d(3, 3, 1)
        self.inner = Branchy()

    def forward(self, x):
        return self.inner(self.pre(x))


def test_untraceable_submodule_is_kept_opaque() -> None:
    graph = fxprune.analyze(Wrapper(), X)
    assert graph.opaque == ("inner",)
    model = Wrapper().eval()
    with pytest.raises(fxprune.TargetUnreachableError):
        fxprune.compile(model, ratio=0.5, example_inputs=X)
    assert any("inner" in r for g in graph.groups for r in g.frozen)


def test_stochastic_depth_and_dropout_pass_channels_through() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), torchvision.ops.StochasticDepth(0.2, "row"), nn.Dropout(0.1), nn.Conv2d(8, 4, 1))
    compile_ok(model)


def test_ignore_keeps_a_modules_output_channels() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    pruned = compile_ok(model, ratio=0.2, ignore=["2"])
    assert pruned.get_submodule("2").out_channels == 8
    assert pruned.get_submodule("0").out_channels < 8


class BufferMLP(nn.Module):
    """A constant table through an MLP (Swin V2's continuous position bias does this)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.randn(1, 5, 5, 4))
        self.mlp = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        bias = self.mlp(self.table).mean((1, 2)).view(1, 8, 1, 1)
        return self.conv(x) + bias


def test_buffer_fed_to_a_linear_is_masked_by_the_oracle() -> None:
    model = BufferMLP().eval()
    graph = fxprune.analyze(model, X)
    table = group_with(model, "table", 3)
    assert table.prunable and "mlp.0.weight[1]" in member_names(table)
    plan = {g.id: list(range(g.width // 2)) for g in graph.prunable_groups}
    pruned = fxprune.prune(model, plan, X)  # verify=True: the oracle must zero the removed table columns
    assert pruned.table.shape[3] == 2


# ------------------------------------------------------------------ einsum
class EinsumOnly(nn.Module):
    """Channels meet only in einsums: a weight contraction (a 1x1 conv written as einsum), a product that
    ties two convs, and a contraction over channels that a later einsum reads back."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(3, 16, 3, padding=1)
        self.w = nn.Parameter(torch.randn(16, 12) * 0.3)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        y = torch.einsum("bchw,bchw->bchw", torch.relu(self.a(x)), self.b(x))  # ties a and b
        z = torch.einsum("bc...,cd->bd...", y, self.w)  # w's dim 0 reads those channels, dim 1 makes new ones
        return self.head(torch.einsum("bdhw->bd", z))


def test_einsum_ties_contracts_and_carries_channels() -> None:
    tied = group_with(EinsumOnly(), "a.weight")
    assert {"a.weight[0]", "b.weight[0]", "w[0]"} <= member_names(tied) and tied.prunable
    made = group_with(EinsumOnly(), "w", dim=1)
    assert {"w[1]", "head.weight[1]"} <= member_names(made) and made.prunable
    pruned = compile_ok(EinsumOnly(), ratio=0.5)
    assert pruned.a.out_channels == pruned.b.out_channels == pruned.w.shape[0] < 16
    assert pruned.w.shape[1] == pruned.head.in_features < 12


class Gram(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 6, 3, padding=1)
        self.head = nn.Linear(36, 5)

    def forward(self, x):
        f = self.b(torch.relu(self.a(x)))
        return self.head(torch.einsum("bchw,bdhw->bcd", f, f).flatten(1))


def test_einsum_keeping_two_channel_subscripts_freezes_them_only() -> None:
    g = group_with(Gram(), "b.weight")
    assert not g.prunable and any("keeps channels along two subscripts" in r for r in g.frozen)
    assert group_with(Gram(), "a.weight").prunable
    pruned = compile_ok(Gram(), ratio=0.2)
    assert pruned.a.out_channels < 8 and pruned.b.out_channels == 6


def test_einsum_subscripts() -> None:
    from fxprune.passes.couple.contract import einsum_subscripts

    assert einsum_subscripts("bchw,cd->bdhw", [4, 2]) == ([list("bchw"), list("cd")], list("bdhw"))
    assert einsum_subscripts("ij,jk", [2, 2]) == ([list("ij"), list("jk")], list("ik"))
    assert einsum_subscripts("...c,c->...", [3, 1]) == ([["...0", "...1", "c"], ["c"]], ["...0", "...1"])


class SegNetLike(nn.Module):
    """An encoder-decoder whose decoder unpools with the encoder's max-pool indices."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.enc2 = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2)
        self.dec2 = nn.Sequential(nn.Conv2d(32, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.dec1 = nn.Conv2d(16, classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, first = self.pool(self.enc1(x))
        x, second = F.max_pool2d(self.enc2(x), 2, return_indices=True)
        x = self.dec2(F.max_unpool2d(x, second, 2))
        return self.dec1(self.unpool(x, first))


def test_max_unpool_ties_the_decoder_to_the_pool_whose_indices_it_reuses() -> None:
    model = lively(SegNetLike().eval())
    x = torch.randn(1, 3, 32, 32)
    graph = fxprune.analyze(model, x)
    group = {(m.name, m.dim): g.id for g in graph.groups for m in g.members}
    assert group[("enc1.0.weight", 0)] == group[("dec2.0.weight", 0)]  # unpooled with enc1's indices
    assert group[("enc2.0.weight", 0)] == group[("dec2.0.weight", 1)]  # unpooled with enc2's indices
    assert group[("enc2.0.weight", 0)] != group[("enc1.0.weight", 0)]
    assert len(graph.prunable_groups) == 2
    small = fxprune.compile(model, ratio=0.5, example_inputs=x)
    assert small(x).shape == model(x).shape


class TinyLM(nn.Module):
    """Token embedding, a residual MLP, a norm and an output layer tied to the embedding."""

    def __init__(self, functional: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.functional = functional
        self.emb = nn.Embedding(50, 32)
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 32)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 50, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = F.embedding(ids, self.emb.weight) if self.functional else self.emb(ids)
        h = h + self.fc2(F.relu(self.fc1(h)))
        return self.head(self.norm(h))


IDS = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("functional", [False, True])
def test_an_embedding_gives_its_weights_dim_1_and_a_tied_output_layer_shares_it(functional: bool) -> None:
    model = TinyLM(functional).eval()
    graph = fxprune.analyze(model, IDS)
    assert [g.width for g in graph.prunable_groups] == [32, 64]  # the hidden size (embedding, norm, tied head) and the MLP
    pruned = fxprune.compile(model, example_inputs=IDS, ratio=0.5)
    assert pruned(IDS).shape == (2, 7, 50)
    weights = {n: p.shape for n, p in pruned.named_parameters(remove_duplicate=False)}
    assert weights["emb.weight"][1] == weights["head.weight"][1] < 32


def test_cat_skips_empty_one_dimensional_tensors_as_torch_does() -> None:
    """A key/value cache starts as a 1-d empty tensor, which torch.cat skips whatever the dim."""

    class Cached(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.out = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.out(torch.cat([y.new_zeros(0), y], dim=2))

    pruned = compile_ok(Cached().eval())
    assert pruned.get_submodule("conv").out_channels < 8


def test_an_rms_norm_written_out_averages_the_kept_channels_and_verifies() -> None:
    """pow / mean over the channel dim / rsqrt: the mean is a statistic over channels, not a freeze."""

    class RMS(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 4)
            self.weight = nn.Parameter(torch.rand(32) + 0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc1(x)
            h = self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))
            return self.fc2(h)

    model, x = RMS().eval(), torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    graph = fxprune.analyze(model, x)
    assert [g.width for g in graph.prunable_groups] == [32] and any("averages over pruned channels" in n for n in graph.notes.values())
    pruned = fxprune.compile(model, example_inputs=x, ratio=0.4)  # verified against the masked mean
    assert pruned.get_submodule("fc1").out_features < 32


@torch.fx.wrap
def toy_gate(x: torch.Tensor, scale: float) -> torch.Tensor:
    """An op fxprune has no rule for: a leaf of the traced graph."""
    return x * torch.sigmoid(scale * x)


class ToyGated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(toy_gate(self.a(x), 2.0))


def test_a_rule_for_a_new_op_is_one_decorated_function(request: pytest.FixtureRequest) -> None:
    """Without a rule the op's channels stay whole (the group is frozen, with the reason); one function
    decorated with ``handles`` where it is written makes them prunable, and the result is verified."""
    from fxprune.passes.couple import rules
    from fxprune.passes.couple.state import RULES, family, handles
    from fxprune.core.groups import Family

    x = torch.randn(1, 3, 8, 8)

    def outputs_of_a() -> fxprune.Group:
        return next(g for g in fxprune.analyze(ToyGated().eval(), x).groups_of("a") if any(m.name == "a.weight" and m.dim == 0 for m in g.members))

    frozen = outputs_of_a()
    assert not frozen.prunable and "toy_gate" in frozen.frozen[0]

    @handles(toy_gate)
    @family(Family.ELEMENTWISE)
    def gate(s, node, args, kwargs):
        """Position by position on its tensor operand: the channels pass through."""
        return rules.merge(s, node, list(args[:1]))

    request.addfinalizer(lambda: RULES.pop(toy_gate))
    group = outputs_of_a()
    assert group.prunable
    pruned = fxprune.prune(ToyGated().eval(), {group.id: list(range(8))}, x)  # verify=True checks it against the masked original
    assert pruned.get_submodule("a").out_channels == 8 and pruned(x).shape == (1, 8, 8, 8)


class Reshaped(nn.Module):
    """A conv's channels through a reshape and back, then another conv."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.a, self.b, self.shape = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1), shape

    def forward(self, x):
        y = self.a(x)
        return self.b(y.reshape(self.shape).reshape(y.shape))


def _structure(deps) -> tuple:
    return ([(g.atoms.tolist(), [(m.name, m.dim) for m in g.members], g.frozen) for g in deps.groups],
            {k: (d, a.tolist()) for k, (d, a) in deps.tensor_atoms.items()}, deps.patches)


@pytest.mark.parametrize("shape", [(2, 2, 4, 8, 8), (2, 8, 64), (2, 512), (2, 32, 16), (4, 4, 8, 8), (2, 8, 8, 8, 1), (16, 64), None])
def test_a_reshape_on_compact_labels_couples_as_the_materialized_labels_do(shape: tuple[int, ...] | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compact path (only the output dims the channel index depends on) against materializing every
    position; None: a channel shuffle written as view, transpose and view, its sizes computed from the width."""
    build = (lambda: Shuffle(False)) if shape is None else (lambda: Reshaped(shape))
    fast = _structure(fxprune.analyze(build(), X))
    monkeypatch.setattr(layout, "reshaped", lambda *args: None)
    assert _structure(fxprune.analyze(build(), X)) == fast
    compile_ok(build())


class Pieces(nn.Module):
    """A conv's channels cut by chunk, split and tensor_split, along the channel dim and across it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 16, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = self.a(x)
        p, q = y.chunk(2, dim=1)
        r, t = torch.split(y, [5, 11], 1)
        u = torch.tensor_split(y, 3, dim=2)
        one, rest = y.split([1, 15], dim=1)
        z = torch.cat([self.b(p), q], 1) + r.mean() + t.mean() + u[0].mean() + one * rest.mean()
        return self.c(z)


def test_pieces_cut_from_compact_labels_couple_as_the_materialized_labels_do(monkeypatch: pytest.MonkeyPatch) -> None:
    fast = _structure(fxprune.analyze(Pieces(), X))
    monkeypatch.setattr(layout, "pieces", lambda *args: None)
    assert _structure(fxprune.analyze(Pieces(), X)) == fast
    compile_ok(Pieces())
