"""Random DAG CNNs: whatever hypothesis builds, the pruned model equals its masked original."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fxprune
from conftest import lively

# A spec is a list of ops; each op reads earlier tensors by index and appends one tensor.
# ("conv", src, out_ch, kernel, groups) ("bn", src) ("relu", src) ("add", a, b) ("cat", a, b)
# ("split", src, piece) ("pool", src) ("shuffle", src) and finally ("head", src, classes).


class SpecNet(nn.Module):
    def __init__(self, spec: list[tuple], channels: list[int]) -> None:
        super().__init__()
        self.spec = spec
        self.layers = nn.ModuleList()
        for op in spec:
            if op[0] == "conv":
                _, src, out, k, g = op
                self.layers.append(nn.Conv2d(channels[src], out, k, padding=k // 2, groups=g))
            elif op[0] == "bn":
                self.layers.append(nn.BatchNorm2d(channels[op[1]]))
            elif op[0] == "head":
                self.layers.append(nn.Linear(channels[op[1]] * 4, op[2]))
            else:
                self.layers.append(nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = [x]
        for op, layer in zip(self.spec, self.layers):
            kind = op[0]
            if kind in ("conv", "bn"):
                y = layer(t[op[1]])
            elif kind == "relu":
                y = F.relu(t[op[1]])
            elif kind == "add":
                y = t[op[1]] + t[op[2]]
            elif kind == "cat":
                y = torch.cat([t[op[1]], t[op[2]]], 1)
            elif kind == "split":
                y = t[op[1]].chunk(2, dim=1)[op[2]]
            elif kind == "pool":
                y = F.max_pool2d(t[op[1]], 2)
            elif kind == "shuffle":
                n, c, h, w = t[op[1]].shape
                y = t[op[1]].view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
            else:  # head: flatten -> linear
                y = layer(torch.flatten(F.adaptive_avg_pool2d(t[op[1]], 2), 1))
            t.append(y)
        return t[-1]


@st.composite
def spec_nets(draw: st.DrawFn) -> SpecNet:
    channels, sizes = [3], [16]
    spec: list[tuple] = []

    def add(op: tuple, ch: int, size: int) -> None:
        spec.append(op)
        channels.append(ch)
        sizes.append(size)

    add(("conv", 0, draw(st.sampled_from([4, 6, 8, 12])), 3, 1), channels[0] and 0, 16)
    channels[-1] = spec[-1][2]
    for _ in range(draw(st.integers(2, 12))):
        src = draw(st.integers(1, len(channels) - 1))
        c, s = channels[src], sizes[src]
        kind = draw(st.sampled_from(["conv", "conv", "gconv", "bn", "relu", "add", "cat", "split", "pool", "shuffle"]))
        if kind in ("conv", "gconv"):
            groups = draw(st.sampled_from([g for g in (2, 4, c) if c % g == 0])) if kind == "gconv" and c > 1 else 1
            out = draw(st.sampled_from([o for o in (2, 4, 6, 8, 12, 16) if o % groups == 0] or [groups]))
            if kind == "gconv" and groups == c and draw(st.booleans()):
                out = c  # depthwise
            add(("conv", src, out, draw(st.sampled_from([1, 3])), groups), out, s)
        elif kind in ("bn", "relu"):
            add((kind, src), c, s)
        elif kind in ("add", "cat"):
            mates = [j for j in range(1, len(channels)) if sizes[j] == s and (kind == "cat" or channels[j] == c)]
            other = draw(st.sampled_from(mates))
            add((kind, src, other), c + channels[other] if kind == "cat" else c, s)
        elif kind == "split" and c % 2 == 0 and c >= 4:
            add(("split", src, draw(st.integers(0, 1))), c // 2, s)
        elif kind == "shuffle" and c % 2 == 0:
            add(("shuffle", src), c, s)
        elif kind == "pool" and s >= 4:
            add(("pool", src), c, s // 2)
    last = len(channels) - 1
    add(("head", last, draw(st.integers(2, 5))), 0, 0)
    with torch.random.fork_rng(devices=[]):  # the same weights whichever tests ran before
        torch.manual_seed(0)
        return SpecNet(spec, channels)


# Pinned so that every run checks the same examples: derandomized (the examples follow from this test's
# source) and no example database (a saved example from an earlier run would change the set).
EXAMPLES = int(os.environ.get("FXPRUNE_EXAMPLES", 200))
SETTINGS = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))

# Share of examples that must actually prune. A net whose channels are mostly frozen (the model's input
# and output, splits and shuffles tying groups together) may not reach the ratio and raises
# TargetUnreachableError, which is fine once in a while; a regression that froze everything would make
# every example do that. Measured with 200 examples: 191 of the pinned examples prune (0.955); over 30
# other hypothesis seeds the share ranged from 0.88 to 0.985 (mean 0.94); the first 20 and 50 pinned
# examples: 0.90 and 0.92. The bound leaves room below all of them.
MIN_PRUNED_SHARE = 0.75


def prune_one(net: SpecNet, ratio: float, selector: str, seed: int) -> bool:
    """True when channels were removed and the result verified against the masked original; False
    when the ratio is out of reach for this net. Fails on anything else."""
    lively(net.eval(), seed)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    try:
        pruned = fxprune.compile(net, ratio=ratio, example_inputs=x, selector=selector, seed=seed)
    except fxprune.TargetUnreachableError:
        return False
    assert "verified" in pruned.meta["fxprune"]  # verify=True: equal to the original with the removed channels zeroed
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in net.parameters())
    with torch.no_grad():
        assert pruned(x).shape == net(x).shape
    rep = fxprune.report(pruned)
    assert rep.flops[1] <= (1 - ratio) * rep.flops[0]
    assert rep.flops[1] == fxprune.count_flops(pruned, x)
    return True


EXAMPLE_ARGS = dict(net=spec_nets(), ratio=st.floats(0.1, 0.7), selector=st.sampled_from(["uniform", "l1"]), seed=st.integers(0, 3))


@pytest.mark.slow
def test_random_dag_oracle_holds() -> None:
    pruned: list[bool] = []

    @SETTINGS
    @given(**EXAMPLE_ARGS)
    def example(net: SpecNet, ratio: float, selector: str, seed: int) -> None:
        pruned.append(prune_one(net, ratio, selector, seed))

    example()
    share = sum(pruned) / len(pruned)
    assert share >= MIN_PRUNED_SHARE, f"only {sum(pruned)} of {len(pruned)} random nets could be pruned"
