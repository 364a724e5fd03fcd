"""Cross-check fxprune against torch-pruning (an independent implementation of the same idea).

For torchvision ``resnet18`` and ``squeezenet1_1`` we remove the SAME output channels of several
convolutions with both tools: through an explicit ``fxprune.prune`` plan on one side and through
``tp.DependencyGraph.get_pruning_group(...).prune()`` on the other. Both tools propagate each removal
through its coupled layers (BatchNorm, residual adds, the next conv's input, the fire modules'
``torch.cat``), so the two pruned models must agree exactly: same parameter names and shapes, same
values, same outputs.

Channels are mapped to fxprune plan positions through ``DependencyGraph.member_atoms`` and
``Group.atoms``; the test checks (rather than assumes) that every channel is its own atom and that
position k of the group is channel k of the chosen conv's output.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

torchvision = pytest.importorskip("torchvision")
tp = pytest.importorskip("torch_pruning")

import fxprune  # noqa: E402

pytestmark = pytest.mark.slow

INPUT_SHAPE = (1, 3, 64, 64)

# Output channels of these convolutions are pruned (key: the conv weight's qualified name). Every entry
# must lie in a different fxprune group; the comment says which coupling it exercises.
TARGETS = {
    "resnet18": [
        "conv1.weight",  # layer1 residual stream: stem conv/bn, every layer1 conv2/bn2, adds, layer2 inputs
        "layer1.0.conv1.weight",  # inner channels of a basic block
        "layer2.0.conv1.weight",  # inner channels of a strided block
        "layer3.0.conv2.weight",  # layer3 residual stream, including the downsample conv/bn
        "layer4.1.conv1.weight",  # inner channels of the last block
    ],
    "squeezenet1_1": [
        "features.0.weight",  # stem conv (no BN) -> ReLU -> MaxPool -> first squeeze
        "features.3.squeeze.weight",  # squeeze conv feeding both expand convs
        "features.3.expand1x1.weight",  # first half of the concat read by features.4.squeeze
        "features.3.expand3x3.weight",  # second half: channel c is features.4.squeeze input 64 + c
        "features.9.expand1x1.weight",  # concat in a later stage
        "features.12.expand3x3.weight",  # last concat, read by the classifier conv
    ],
}


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    _make_lively(model, seed=1)
    return model


def _make_lively(model: nn.Module, seed: int) -> None:
    """Random BatchNorm statistics and affine parameters, so every channel changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)  # uniform(0.5, 2)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)  # uniform(0.5, 1.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)


def _removed_channels(model: nn.Module, targets: list[str], seed: int) -> dict[str, list[int]]:
    """A seeded random 30-50% of the output channels of each target conv, sorted."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    out = {}
    for name in targets:
        width = params[name].shape[0]
        frac = 0.3 + 0.2 * torch.rand((), generator=gen).item()
        k = max(1, int(round(frac * width)))
        out[name] = sorted(torch.randperm(width, generator=gen)[:k].tolist())
    return out


def _fxprune_plan(graph: fxprune.DependencyGraph, removed: dict[str, list[int]]) -> dict[int, list[int]]:
    """Translate {conv weight name: removed output channels} into {group id: kept positions}."""
    plan: dict[int, list[int]] = {}
    for name, channels in removed.items():
        owners = [g for g in graph.groups if any(m.name == name and m.dim == 0 for m in g.members)]
        assert len(owners) == 1, f"{name}[0] should belong to exactly one group, got {[g.id for g in owners]}"
        group = owners[0]
        assert group.prunable, f"group {group.id} of {name}[0] is not prunable: {group.frozen}"
        assert group.id not in plan, f"two targets share group {group.id}; pick channels for one of them only"

        atoms = graph.member_atoms[(name, 0)]
        assert atoms.numel() == group.width, (name, atoms.numel(), group.width)
        # One atom per channel, and the group's atoms are this conv's output channels in order.
        assert torch.equal(atoms, group.atoms), f"atoms of {name}[0] are not the atoms of group {group.id} in order"
        assert atoms.unique().numel() == atoms.numel(), f"{name}[0]: some channels share an atom"

        position = {int(a): k for k, a in enumerate(group.atoms.tolist())}
        drop = {position[int(atoms[c])] for c in channels}
        assert drop == set(channels)
        plan[group.id] = [k for k in range(group.width) if k not in drop]
    return plan


def _torch_pruning(model: nn.Module, removed: dict[str, list[int]], example: torch.Tensor) -> nn.Module:
    """The same removal with torch-pruning, on a deep copy (torch-pruning edits modules in place)."""
    model = copy.deepcopy(model)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
    for name, channels in removed.items():
        conv = model.get_submodule(name.rsplit(".", 1)[0])
        assert isinstance(conv, nn.Conv2d) and name.endswith(".weight")
        group = dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(channels))
        assert dg.check_pruning_group(group), f"torch-pruning refuses to prune {name}"
        group.prune()
    return model.eval()


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", sorted(TARGETS))
def test_same_channels_same_model(arch: str) -> None:
    model = _build(arch)
    gen = torch.Generator().manual_seed(2)
    example = torch.randn(INPUT_SHAPE, generator=gen)
    check = torch.randn((2,) + INPUT_SHAPE[1:], generator=gen)  # a different input, batch of 2
    removed = _removed_channels(model, TARGETS[arch], seed=3)
    original_state = _snapshot(model)
    original_shapes = {n: p.shape for n, p in model.named_parameters()}

    # fxprune
    graph = fxprune.analyze(model, (example,))
    plan = _fxprune_plan(graph, removed)
    pruned = fxprune.prune(model, plan, (example,))

    # fxprune never modifies its input.
    after = model.state_dict()
    assert after.keys() == original_state.keys()
    for k, v in original_state.items():
        assert torch.equal(after[k], v), f"fxprune modified the user's model: {k}"

    # torch-pruning on a copy of the same lively model
    reference = _torch_pruning(model, removed, example)

    # Same parameter names and shapes, for every parameter.
    fx_params = dict(pruned.named_parameters())
    tp_params = dict(reference.named_parameters())
    assert sorted(fx_params) == sorted(tp_params)
    fx_shapes = {n: tuple(p.shape) for n, p in fx_params.items()}
    tp_shapes = {n: tuple(p.shape) for n, p in tp_params.items()}
    mismatched = {n: (fx_shapes[n], tp_shapes[n]) for n in fx_shapes if fx_shapes[n] != tp_shapes[n]}
    assert not mismatched, f"shape mismatch (fxprune, torch-pruning): {mismatched}"
    # Something was actually pruned.
    assert any(fx_shapes[n] != tuple(original_shapes[n]) for n in fx_shapes)

    # Same values, parameter by parameter, and buffer by buffer (BatchNorm statistics).
    for n in fx_params:
        assert torch.equal(fx_params[n].detach(), tp_params[n].detach()), f"values differ: {n}"
    fx_buffers = dict(pruned.named_buffers())
    tp_buffers = dict(reference.named_buffers())
    assert sorted(fx_buffers) == sorted(tp_buffers)
    for n in fx_buffers:
        assert fx_buffers[n].shape == tp_buffers[n].shape, f"buffer shape differs: {n}"
        assert torch.equal(fx_buffers[n], tp_buffers[n]), f"buffer values differ: {n}"

    if arch == "squeezenet1_1":
        # Independent of both tools: features.4.squeeze reads cat([expand1x1, expand3x3]) of features.3,
        # so its kept input channels are the kept 1x1 channels, then 64 + the kept 3x3 channels.
        kept = [c for c in range(64) if c not in removed["features.3.expand1x1.weight"]]
        kept += [64 + c for c in range(64) if c not in removed["features.3.expand3x3.weight"]]
        expected = original_state["features.4.squeeze.weight"][:, kept]
        assert torch.equal(fx_params["features.4.squeeze.weight"].detach(), expected)

    # Same outputs.
    pruned.eval()
    with torch.no_grad():
        out_fx = pruned(check)
        out_tp = reference(check)
    assert out_fx.shape == out_tp.shape == (2, 1000)
    torch.testing.assert_close(out_fx, out_tp, rtol=1e-5, atol=1e-6)

    # And pruning really changed the function (the lively BN makes every removed channel matter).
    with torch.no_grad():
        out_orig = model(check)
    assert not torch.allclose(out_orig, out_fx, rtol=1e-3, atol=1e-4)
