"""The HTML report and the data-flow picture of the channel groups: files, layout, a real browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import fxprune
from fxprune import pipeline
from fxprune.core import dataflow
from fxprune.render import picture
from fxprune.cli import main
from fxprune.report import si

SHAPE = "1,3,64,64"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``fxprune compile --report-dir`` on ResNet-18 (residual adds, shortcut convs, a frozen input and output)."""
    out = tmp_path_factory.mktemp("report")
    assert main(["--quiet", "compile", "torchvision:resnet18", "--ratio", "0.5", "--input-shape", SHAPE, "--round-to", "1",
                 "--no-verify", "--report-dir", str(out)]) == 0
    return out


def _remote_references(page: str) -> list[str]:
    """src/href attributes and CSS url()/@import that point at the network."""
    return re.findall(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//[^"'\s>]*""", page) + re.findall(r"(?:url\(|@import)\s*['\"]?\s*(?:https?:)?//", page)


def test_report_html_is_self_contained_and_names_every_layer(report_dir: Path) -> None:
    page = (report_dir / "report.html").read_text(encoding="utf-8")
    report = fxprune.Report.from_dict(json.loads((report_dir / "report.json").read_text()))
    assert page.startswith("<!DOCTYPE html>") and _remote_references(page) == []
    assert "<script src" not in page and "<link" not in page
    for row in report.rows:
        assert f">{row.name}<" in page  # in the table, the widths chart and the picture
    assert _layer_table(page).count("<tr>") == len(report.rows)
    assert f"<td>{si(report.flops[0])}</td><td>{si(report.flops[1])}</td>" in page  # totals in report.si's units
    assert page.count('class="fxprune-groups"') == 1 and page.count('class="fxprune-widths"') == 1
    assert "frozen: model output" in page and "frozen: model input x" in page and "<title>" in page


def _layer_table(page: str) -> str:
    """The body of the per-layer table."""
    table = page[page.index('id="layers-table"'):]
    return table[table.index("<tbody>"):table.index("</tbody>")]


def test_report_page_shows_measured_latency() -> None:
    from fxprune.render.html import report_page
    from fxprune.report import LayerRow

    rows = [LayerRow("conv", "Conv2d", (3, 3), (64, 32), (1792, 896), (10**9, 5 * 10**8))]
    latency = {"before_ms": 12.5, "after_ms": 6.25, "speedup": 2.0, "layers_ms": {"conv": [4.0, 2.0]}}
    page = report_page(fxprune.Report(rows, (1792, 896), (10**9, 5 * 10**8), (0, 0), latency=latency), None)
    assert "<td>2.00G</td><td>1.00G</td>" in page and "<td>12.5</td><td>6.25</td><td>2x faster</td>" in page
    assert "est. ms (layer alone)" in page and page.count("4 → 2") == 2 and 'id="groups"' not in page  # the row and the total
    assert "the rows add up to 4 -&gt; 2 ms of the 12.5 -&gt; 6.25 ms measured" in page


def test_remote_references_are_found() -> None:
    assert _remote_references('<script src="https://cdn.example/x.js"></script><link href="//fonts.example/a.css">') != []
    assert _remote_references('<svg xmlns="http://www.w3.org/2000/svg"><a href="#groups">x</a></svg>') == []


@pytest.mark.parametrize("name", ["resnet18", "squeezenet1_1"])
def test_picture_boxes_never_overlap_and_follow_the_data(name: str) -> None:
    model = getattr(torchvision.models, name)(weights=None).eval()
    a = pipeline.analyze(model, torch.randn(1, 3, 64, 64))
    blocks = dataflow.blocks(a.gm, a.deps)
    pic = picture.picture(blocks, a.deps)
    for i, s in enumerate(pic.shapes):
        assert 0 <= s.x and s.x + s.w <= pic.width and 0 <= s.y and s.y + s.h <= pic.height
        for t in pic.shapes[i + 1:]:
            assert s.x + s.w <= t.x or t.x + t.w <= s.x or s.y + s.h <= t.y or t.y + t.h <= s.y, (s.text, t.text)
    layers = {s.text: s for s in pic.shapes if s.note}
    for b in blocks:  # every block below the blocks that feed it
        for p in b.preds:
            if blocks[p].name in layers and b.name in layers:
                assert layers[blocks[p].name].y < layers[b.name].y
    frozen = [s for s in pic.shapes if s.hatched]
    assert frozen and all(s.fill == picture.FROZEN[0] for s in frozen)
    coloured = [s for s in pic.shapes if s.group is not None and not a.deps.groups[s.group].frozen]
    assert coloured and all(s.fill != picture.FROZEN[0] for s in coloured)
    fills = {}
    for s in coloured:  # one colour per group: the legend chip and every box of the group agree
        assert fills.setdefault(s.group, s.fill) == s.fill


def test_inspect_draws_one_layout_as_svg_png_and_html(tmp_path: Path) -> None:
    svg, png, page = tmp_path / "g.svg", tmp_path / "g.png", tmp_path / "g.html"
    assert main(["--quiet", "inspect", "torchvision:squeezenet1_1", "--input-shape", SHAPE, "--svg", str(svg), "--png", str(png),
                 "--html", str(page)]) == 0
    text = svg.read_text(encoding="utf-8")
    assert text.startswith("<svg") and "features.3.expand3x3" in text and ">cat<" in text and "frozen: model input x" in text
    assert text.strip() in page.read_text(encoding="utf-8")  # the page holds the very same picture
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mpimg = pytest.importorskip("matplotlib.image")
    height, width = mpimg.imread(png).shape[:2]
    assert abs(width / height - _size(text)[0] / _size(text)[1]) < 0.02  # the PNG is drawn from the same layout


def _size(svg: str) -> tuple[float, float]:
    w, h = re.search(r'viewBox="0 0 ([\d.]+) ([\d.]+)"', svg).groups()  # type: ignore[union-attr]
    return float(w), float(h)


class Untraceable(nn.Module):
    """Python control flow over a shape: symbolic_trace fails, torch.export captures it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if x.shape[-1] > 4:
            x = self.conv(x)
        return self.head(self.bn(x).relu().mean((2, 3)))


def test_report_after_torch_export_names_modules_with_channels_and_parameters() -> None:
    x = torch.randn(1, 3, 8, 8)
    pruned = fxprune.compile(Untraceable().eval(), ratio=0.4, example_inputs=x)
    rep = fxprune.report(pruned)
    assert any(n.startswith("captured with torch.export") for n in rep.notes)
    assert [(r.name, r.op) for r in rep.rows] == [("stem.0", "Conv2d"), ("stem.1", "BatchNorm2d"), ("conv", "Conv2d"),
                                                  ("bn", "BatchNorm2d"), ("head", "Linear")]
    rows = {r.name: r for r in rep.rows}
    kept = pruned.meta["fxprune"]["kept"]["parameters"]
    c1, c2 = len(kept["stem.0.weight"]["0"]), len(kept["conv.weight"]["0"])
    assert c1 < 16 and c2 < 32
    assert rows["stem.0"].in_channels == (3, 3) and rows["stem.0"].out_channels == (16, c1)
    assert rows["stem.1"].out_channels == (16, c1) and rows["conv"].in_channels == (16, c1)
    assert rows["head"].in_channels == (32, c2) and rows["head"].out_channels == (10, 10)
    assert rows["stem.0"].params == (16 * 3 * 9 + 16, c1 * 3 * 9 + c1) and rows["bn"].params == (64, 2 * c2)
    assert sum(r.params[0] for r in rep.rows) == rep.params[0] and sum(r.params[1] for r in rep.rows) == rep.params[1]


def test_group_table_shows_the_input_channels() -> None:
    for model, x in ((Untraceable().eval(), torch.randn(1, 3, 8, 8)), (torchvision.models.resnet18(weights=None).eval(), torch.randn(1, 3, 32, 32))):
        graph = fxprune.analyze(model, x)
        first = graph.groups[0]
        assert first.frozen == ("model input x",) and graph.channels(first) == 3
        assert re.search(r"^\s+0\s+3 \(1 atom\)\s+1\s+frozen: model input x", str(graph), re.M), str(graph)
        assert all(graph.channels(g) == g.width for g in graph.prunable_groups)


def _browser() -> str:
    found = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if found is None:
        pytest.skip("no headless browser: install chromium (apt-get install chromium) to render report.html")
    return found


def _run_browser(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}",
                           "--enable-logging=stderr", "--v=0", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_report_renders_in_a_headless_browser(report_dir: Path, tmp_path: Path) -> None:
    browser = _browser()
    url = (report_dir / "report.html").resolve().as_uri()
    shot = tmp_path / "report.png"
    run = _run_browser(browser, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1200,3000", url)
    assert shot.is_file(), run.stderr[-2000:]
    console = [line for line in run.stderr.splitlines() if re.search(r":CONSOLE[:(]", line)]
    assert console == []  # the page logs nothing: no script error, no warning
    mpimg = pytest.importorskip("matplotlib.image")
    pixels = mpimg.imread(shot)[..., :3].reshape(-1, 3)
    colours = {tuple(p) for p in (pixels[:: 97] * 255).round().astype(int).tolist()}
    assert len(colours) > 40  # text, tables, bars and the group colours, not a blank page
    dom = _run_browser(browser, tmp_path / "profile", "--dump-dom", url + "#sort=-flops")
    assert 'data-ready="1"' in dom.stdout  # the script ran to its end
    assert not [line for line in dom.stderr.splitlines() if re.search(r":CONSOLE[:(]", line)]
    flops_cells = [row.split("<td")[7] for row in _layer_table(dom.stdout).split("<tr>")[1:]]
    values = [float(re.search(r'data-v="([\d.e+-]+)"', c).group(1)) for c in flops_cells]  # type: ignore[union-attr]
    assert values == sorted(values, reverse=True) and len(values) > 20  # sorted by the script, largest FLOPs first
