"""save / load / apply_plan: round trips, no unpickling, damaged or foreign files, mismatched plans."""

from __future__ import annotations

import json
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import fxprune
from conftest import lively
from fxprune.core.provenance import provenance

X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def resnet(name: str = "resnet18") -> nn.Module:
    """A seeded random-init torchvision ResNet: two calls build the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return lively(getattr(torchvision.models, name)(weights=None).eval())


@pytest.fixture(scope="module")
def pruned() -> torch.fx.GraphModule:
    """resnet18 at half the FLOPs, recording its fingerprint and input shapes as compile will."""
    model = resnet()
    gm = fxprune.compile(model, ratio=0.5, example_inputs=X)
    gm.meta["fxprune"].update(provenance(fxprune.analyze(model, X), (X,)))
    return gm


@pytest.fixture(scope="module")
def saved(pruned: torch.fx.GraphModule, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("archive") / "resnet18.pt2"
    fxprune.save(pruned, path)
    return path


def rewrite(src: Path, dst: Path, edit: Callable[[str, bytes], bytes]) -> None:
    """Copy an archive entry by entry, passing each (name, content) through ``edit``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            zout.writestr(name, edit(name, zin.read(name)))


def test_load_round_trip_keeps_outputs_and_record(pruned: torch.fx.GraphModule, saved: Path) -> None:
    loaded = fxprune.load(saved)
    assert isinstance(loaded, torch.fx.GraphModule)
    torch.testing.assert_close(loaded(X), pruned(X))
    expected = {**json.loads(json.dumps(pruned.meta["fxprune"])), "dims": "dynamic dims: batch of input 0"}
    assert loaded.meta["fxprune"] == expected
    assert fxprune.report(loaded).flops == fxprune.report(pruned).flops


def test_load_never_unpickles(saved: Path, pruned: torch.fx.GraphModule, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("fxprune.load unpickled something")

    for owner, name in [(pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (torch, "load"),
                        (torch.serialization, "load"), (torch._C, "_pickle_load_obj")]:
        monkeypatch.setattr(owner, name, refuse)
    torch.testing.assert_close(fxprune.load(saved)(X), pruned(X))


def test_save_without_recorded_inputs_needs_example_inputs(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    gm = fxprune.compile(model, ratio=0.3, example_inputs=X)
    gm.meta["fxprune"].pop("inputs", None)
    with pytest.raises(fxprune.ArgumentError, match="needs example_inputs="):
        fxprune.save(gm, tmp_path / "m.pt2")
    fxprune.save(gm, tmp_path / "m.pt2", example_inputs=X)
    again = fxprune.load(tmp_path / "m.pt2")
    fxprune.save(again, tmp_path / "again.pt2")  # a loaded model records its input shapes
    torch.testing.assert_close(fxprune.load(tmp_path / "again.pt2")(X), gm(X))
    with pytest.raises(fxprune.ArgumentError, match="returned by fxprune.compile"):
        fxprune.save(model, tmp_path / "plain.pt2")


def test_apply_plan_from_file_dict_and_plan_object(pruned: torch.fx.GraphModule, saved: Path) -> None:
    fresh = resnet()  # the same weights: the same pruned outputs
    for plan in (saved, pruned.meta["fxprune"]["plan"], fxprune.Plan.from_json(json.dumps(pruned.meta["fxprune"]["plan"]))):
        again = fxprune.apply_plan(fresh, plan, X, verify=False)
        assert again.meta["fxprune"]["kept"] == pruned.meta["fxprune"]["kept"]
    torch.testing.assert_close(again(X), pruned(X))


def test_apply_plan_to_another_architecture_names_the_group(saved: Path) -> None:
    with pytest.raises(fxprune.PlanError, match=r"made for another architecture than ResNet: group \d+ .*layer1\.2"):
        fxprune.apply_plan(resnet("resnet34"), saved)


def test_apply_plan_without_fingerprint_still_checks_ranges() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    with pytest.raises(fxprune.PlanError, match="names group 7"):
        fxprune.apply_plan(model, {"7": [0]}, X)
    with pytest.raises(fxprune.PlanError, match="keep must be distinct positions in 0..7"):
        fxprune.apply_plan(model, {"1": [0, 8]}, X)


def edit_record(change: Callable[[dict], None]) -> Callable[[str, bytes], bytes]:
    """An archive edit that applies ``change`` to the parsed extra/fxprune.json."""
    def apply(name: str, data: bytes) -> bytes:
        if not name.endswith("extra/fxprune.json"):
            return data
        doc = json.loads(data)
        change(doc)
        return json.dumps(doc).encode()
    return apply


def pickle_first_weight(name: str, data: bytes) -> bytes:
    """Mark one weight as pickled, as a hostile file would to reach torch.load(weights_only=False)."""
    if name.endswith("model_weights_config.json"):
        config = json.loads(data)
        next(iter(config["config"].values()))["use_pickle"] = True
        return json.dumps(config).encode()
    return data


def flip_weight_bit(name: str, data: bytes) -> bytes:
    return bytes([data[0] ^ 1]) + data[1:] if "/data/weights/weight_" in name else data


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda b: b[: len(b) // 2] + bytes([b[len(b) // 2] ^ 0xFF]) + b[len(b) // 2 + 1:], "corrupt|sha256"),
        (lambda b: b[: len(b) * 2 // 3], "not a zip archive, or truncated"),
        (lambda b: b"garbage " * 64, "not a zip archive"),
    ],
    ids=["flipped-byte", "truncated", "garbage"],
)
def test_damaged_file_is_an_archive_error_naming_it(saved: Path, tmp_path: Path, damage: Callable[[bytes], bytes], match: str) -> None:
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(damage(saved.read_bytes()))
    with pytest.raises(fxprune.ArchiveError, match=match) as info:
        fxprune.load(bad)
    assert str(bad) in str(info.value) and "fxprune.save" in str(info.value)


@pytest.mark.parametrize(
    "edit, match",
    [
        (edit_record(lambda doc: doc.update(format="fxprune/0")), "format 'fxprune/0', but this fxprune reads 'fxprune/1'"),
        (edit_record(lambda doc: doc["fxprune"].update(inputs="1x3x64x64")), "fxprune record is malformed"),
        (edit_record(lambda doc: doc["fxprune"]["plan"].update({"1": [0]})), "do not match the sha256 recorded"),
        (flip_weight_bit, "do not match the sha256 recorded"),
        (pickle_first_weight, "lists a pickled tensor"),
    ],
    ids=["format-version", "malformed-record", "edited-plan", "edited-weight", "pickled-weight"],
)
def test_tampered_archive_is_refused(saved: Path, tmp_path: Path, edit: Callable[[str, bytes], bytes], match: str) -> None:
    bad = tmp_path / "tampered.pt2"
    rewrite(saved, bad, edit)
    with pytest.raises(fxprune.ArchiveError, match=match) as info:
        fxprune.load(bad)
    assert str(bad) in str(info.value)


def test_foreign_files_are_refused(tmp_path: Path) -> None:
    plain = tmp_path / "plain.pt2"
    torch.export.save(torch.export.export(nn.Conv2d(3, 4, 1), (X,)), plain)
    pickled = tmp_path / "pickled.pt"
    torch.save({"w": torch.zeros(2)}, pickled)
    for path, match in [(plain, "not an fxprune archive"), (pickled, "not an fxprune archive"), (tmp_path / "nope.pt2", "cannot read")]:
        with pytest.raises(fxprune.ArchiveError, match=match) as info:
            fxprune.load(path)
        assert str(path) in str(info.value)
    with pytest.raises(fxprune.ArchiveError, match="not an fxprune archive"):
        fxprune.apply_plan(nn.Conv2d(3, 4, 1), plain)
