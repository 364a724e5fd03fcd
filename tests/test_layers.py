"""The package's layers (docs/design.md): every relative import goes down a layer or stays within it,
and every target that compile takes goes through one function, ``targets.reach``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import fxprune
from fxprune import targets
from fxprune.latency import costmodel, timing
from conftest import FlopClock, layer_latency

ROOT = Path(fxprune.__file__).parent

LAYERS = (
    ("core", ("fxprune.core", "fxprune.errors", "fxprune.report")),
    ("passes, selection, measurement", ("fxprune.passes", "fxprune.selection", "fxprune.latency", "fxprune.results")),
    ("the pipeline", ("fxprune.pipeline",)),
    ("reaching a target", ("fxprune.targets",)),
    ("front doors", ("fxprune",)),
)
"""Bottom to top, as docs/design.md lists them; a module belongs to the layer of its longest prefix."""


def layer(module: str) -> int:
    found = [(len(p), i) for i, (_, prefixes) in enumerate(LAYERS) for p in prefixes if module == p or module.startswith(p + ".")]
    return max(found)[1]


def relative_imports(path: Path, source: str | None = None) -> list[tuple[str, str]]:
    """(importing module, imported module) for each ``from .`` import in ``path`` (or in ``source``, read as that file)."""
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    package = module if parts[-1] == "__init__" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
            targets_ = [f"{base}.{node.module}"] if node.module else [f"{base}.{a.name}" for a in node.names]
            out += [(module, t) for t in targets_]
    return out


def upward(path: Path, source: str | None = None) -> list[str]:
    return [f"{m} ({LAYERS[layer(m)][0]}) imports {t} ({LAYERS[layer(t)][0]})"
            for m, t in relative_imports(path, source) if layer(t) > layer(m)]


def test_no_import_goes_up_a_layer() -> None:
    found = [line for path in sorted(ROOT.rglob("*.py")) for line in upward(path)]
    assert not found, "imports that go up a layer:\n" + "\n".join(found)


def test_the_layer_check_sees_an_upward_import() -> None:
    """A pass that imported the pipeline would be reported."""
    path = ROOT / "passes" / "annotate.py"
    found = upward(path, path.read_text() + "\nfrom ..pipeline import analyze\n")
    assert found == ["fxprune.passes.annotate (passes, selection, measurement) imports fxprune.pipeline (the pipeline)"]


@pytest.mark.parametrize("target", [{"ratio": 0.5}, {"target_gflops": 0.004}, {"speedup": 1.5}, {"target_latency_ms": 2.0}])
def test_every_target_goes_through_one_function(monkeypatch: pytest.MonkeyPatch, target: dict) -> None:
    monkeypatch.setattr(timing, "time_calls", FlopClock())
    monkeypatch.setattr(costmodel, "layer_ms", layer_latency)
    calls = []
    reach = targets.reach
    monkeypatch.setattr(targets, "reach", lambda *args, **kwargs: calls.append(args[2]) or reach(*args, **kwargs))
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()
    pruned = fxprune.compile(model, example_inputs=torch.randn(1, 3, 8, 8), verify=False, cache=False, **target)
    assert len(calls) == 1 and calls[0].describe() == f"{next(iter(target))}={next(iter(target.values())):g}"
    assert fxprune.report(pruned).macs[1] < fxprune.report(pruned).macs[0]


def test_modules_are_short_and_named_once() -> None:
    """At most 400 lines a module, and no two modules of the package share a file name."""
    modules = [p for p in ROOT.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in modules if (n := len(p.read_text().splitlines())) > 400]
    assert not long, long
    names = [p.name for p in modules]
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})


def test_every_selector_is_exported_from_the_one_list() -> None:
    """``SELECTORS`` builds the package's selector exports: each class under its own name, in ``__all__``."""
    for cls in fxprune.SELECTORS.values():
        assert getattr(fxprune, cls.__name__) is cls and cls.__name__ in fxprune.__all__
    assert all(hasattr(fxprune, name) for name in fxprune.__all__)
