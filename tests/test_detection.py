"""Whole torchvision detectors, one per family: their image transform, anchors, box decoding and NMS run
in Python on the data, so fxprune captures the ops of one run and returns a pruned copy of the module
tree. Backbone, FPN and heads all lose channels, coupled across the glue (RoI pooling, shared heads
over FPN levels), and the copy still takes a list of images and returns the usual list of dicts."""

from __future__ import annotations

import copy
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

import fxprune
import fxprune.cli

pytestmark = pytest.mark.slow

SMALL = {"min_size": 128, "max_size": 160}
FAMILIES: dict[str, dict[str, Any]] = {
    "fasterrcnn_mobilenet_v3_large_320_fpn": {"box_score_thresh": 0.0, **SMALL},
    "retinanet_resnet50_fpn": {"score_thresh": 0.0, **SMALL},
    "fcos_resnet50_fpn": {"score_thresh": 0.0, **SMALL},
    "ssdlite320_mobilenet_v3_large": {"score_thresh": 0.0},
    "maskrcnn_resnet50_fpn": {"box_score_thresh": 0.0, "rpn_post_nms_top_n_test": 200, "box_detections_per_img": 20, **SMALL},
    "keypointrcnn_resnet50_fpn": {"box_score_thresh": 0.0, "rpn_post_nms_top_n_test": 200, "box_detections_per_img": 10, **SMALL},
}
# Parameters of the backbone's feature extractor; everything else is FPN, extra layers and heads.
FEATURES = ("backbone.body.", "backbone.features.")


def detector(name: str) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None, weights_backbone=None, **FAMILIES[name]).eval()


def images(*sizes: tuple[int, int]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.rand(3, h, w, generator=gen) for h, w in sizes]


def head_params(model: nn.Module) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith(FEATURES))


@pytest.mark.parametrize("name", FAMILIES)
def test_detector_prunes_whole_and_still_detects(name: str) -> None:
    model = detector(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    example = images((128, 160))
    pruned = fxprune.compile(model, ratio=0.5, example_inputs=(example,), round_to=8)

    assert type(pruned) is type(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the user's model changed"
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    verified = pruned.meta["fxprune"]["verified"]
    assert verified["max_abs_error"] <= verified["tolerance"]

    report = fxprune.report(pruned)
    assert report.macs[1] <= 0.51 * report.macs[0]
    assert head_params(pruned) <= 0.8 * head_params(model)

    batch = images((128, 160), (150, 120))  # a list of images of other sizes than the example's
    with torch.no_grad():
        got, want = pruned(batch), model(batch)
    assert len(got) == 2 and [set(d) for d in got] == [set(d) for d in want]
    assert all(len(d["boxes"]) > 0 and d["boxes"].shape[1] == 4 for d in got)


@pytest.fixture(scope="module")
def faster_rcnn() -> tuple[nn.Module, nn.Module]:
    model = detector("fasterrcnn_mobilenet_v3_large_320_fpn")
    return model, fxprune.compile(model, ratio=0.5, example_inputs=(images((128, 160)),), round_to=8)


def test_fpn_channels_are_coupled_across_rpn_and_roi_heads(faster_rcnn: tuple[nn.Module, nn.Module]) -> None:
    _, pruned = faster_rcnn
    fpn = {block[0].out_channels for block in pruned.backbone.fpn.layer_blocks}
    assert len(fpn) == 1 and fpn.pop() == pruned.rpn.head.conv[0][0].in_channels < 256
    assert pruned.roi_heads.box_head.fc6.in_features == pruned.rpn.head.conv[0][0].in_channels * 7 * 7


def test_pruned_detector_trains(faster_rcnn: tuple[nn.Module, nn.Module]) -> None:
    model, pruned = faster_rcnn
    trained = copy.deepcopy(pruned).train()
    target = {"boxes": torch.tensor([[10.0, 20.0, 90.0, 100.0]]), "labels": torch.tensor([3])}
    losses = trained(images((128, 160)), [target])
    total = sum(losses.values())
    total.backward()
    assert torch.isfinite(total) and trained.roi_heads.box_head.fc6.weight.grad is not None
    assert model.roi_heads.box_head.fc6.weight.grad is None  # the result owns its tensors


def test_save_and_load_rebuild_the_pruned_detector(faster_rcnn: tuple[nn.Module, nn.Module], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    _, pruned = faster_rcnn
    name = "fasterrcnn_mobilenet_v3_large_320_fpn"
    path = tmp_path / "detector.pt2"
    fxprune.save(pruned, path)
    with pytest.raises(fxprune.ArgumentError, match=r"plan and weights, not a graph: .* load\(path, model=\.\.\.\)"):
        fxprune.load(path)
    fresh = detector(name)
    untouched = copy.deepcopy(fresh.state_dict())
    loaded = fxprune.load(path, model=fresh)
    assert type(loaded) is type(pruned) and fxprune.report(loaded).flops == fxprune.report(pruned).flops
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in untouched.items())
    # The plan alone rebuilds the architecture too; load_state_dict then restores the weights.
    plan = json.loads(json.dumps(pruned.meta["fxprune"]["plan"]))
    rebuilt = fxprune.apply_plan(detector(name), plan, (images((128, 160)),), verify=False)
    rebuilt.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        want = pruned(images((140, 140)))
        for got in (loaded(images((140, 140))), rebuilt(images((140, 140)))):
            torch.testing.assert_close(got[0]["boxes"], want[0]["boxes"], rtol=1e-4, atol=1e-3)
    assert fxprune.cli.main(["report", str(path)]) == 0
    assert "backbone.fpn.layer_blocks.0.0 " in capsys.readouterr().out
    with pytest.raises(fxprune.PlanError, match="another architecture than SSD"):
        fxprune.load(path, model=detector("ssdlite320_mobilenet_v3_large"))


def test_a_detector_archive_refuses_changed_weights_and_extra_entries(faster_rcnn: tuple[nn.Module, nn.Module], tmp_path: Path) -> None:
    _, pruned = faster_rcnn
    fxprune.save(pruned, tmp_path / "detector.pt2")
    with zipfile.ZipFile(tmp_path / "detector.pt2") as zf:
        entries = {n: zf.read(n) for n in zf.namelist()}
    weights = next(n for n in entries if n.endswith("weights.safetensors"))
    changed = {**entries, weights: entries[weights][:-4] + b"\0\0\0\0"}
    extra = {**entries, "model/data/extra.bin": b"x"}
    for files, match in [(changed, "do not match the sha256"), (extra, "unexpected entry model/data/extra.bin")]:
        with zipfile.ZipFile(tmp_path / "edited.pt2", "w") as zf:
            for n, data in files.items():
                zf.writestr(n, data)
        with pytest.raises(fxprune.ArchiveError, match=match):
            fxprune.load(tmp_path / "edited.pt2", model=detector("fasterrcnn_mobilenet_v3_large_320_fpn"))
