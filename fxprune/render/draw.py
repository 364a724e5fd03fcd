"""Drawings for people: the dependency groups, per-layer widths, and a report folder.

The dependency groups are drawn in data-flow order (``picture.py`` places every box once): as SVG or
HTML text with no extra package, or as PNG/PDF with matplotlib (``pip install fxprune[plot]``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.fx

from ..errors import ArgumentError
from ..core.groups import DependencyGraph
from .html import groups_page, report_page
from .picture import FONT, FONT_NAME, Picture, model_picture
from ..report import Report
from .svg import picture_svg

__all__ = ["draw_groups", "draw_picture", "draw_widths", "draw_history", "write_report_dir"]

_FORMATS = (".dot", ".svg", ".html", ".png", ".pdf")


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ArgumentError("drawing needs matplotlib: pip install 'fxprune[plot]'") from exc
    return plt


def draw_groups(gm: torch.fx.GraphModule, deps: DependencyGraph, path: str | Path, title: str = "") -> Path:
    """Write the dependency groups of captured ``gm`` to ``path``: ``.dot`` text (groups and their members),
    or the data-flow picture as ``.svg``, ``.html``, ``.png`` or ``.pdf``."""
    path = Path(path)
    if path.suffix not in _FORMATS:
        raise ArgumentError(f"cannot draw to {path}: use a .dot, .svg, .html, .png or .pdf file name")
    if path.suffix == ".dot":
        path.write_text(deps.to_dot())
        return path
    pic = model_picture(gm, deps, title=title)
    if path.suffix == ".svg":
        path.write_text(picture_svg(pic) + "\n", encoding="utf-8")
    elif path.suffix == ".html":
        path.write_text(groups_page(deps, pic, title), encoding="utf-8")
    else:
        draw_picture(pic, path)
    return path


def draw_picture(pic: Picture, path: str | Path, dpi: int = 110) -> Path:
    """Render ``pic`` with matplotlib (PNG, PDF ...): the same boxes, lines and words as its SVG."""
    from matplotlib.patches import FancyBboxPatch, PathPatch
    from matplotlib.path import Path as MplPath

    plt = _pyplot()
    fig = plt.figure(figsize=(pic.width / 100, pic.height / 100))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, pic.width)
    ax.set_ylim(pic.height, 0)
    ax.axis("off")
    pt = 72 / 100  # points per pixel of the layout at 100 pixels per inch
    font = {"family": [FONT_NAME, "monospace"], "fontsize": FONT * pt}
    for e in pic.edges:
        codes = [MplPath.MOVETO] + [MplPath.CURVE4 if e.curved else MplPath.LINETO] * (len(e.points) - 1)
        ax.add_patch(PathPatch(MplPath(e.points, codes), fill=False, edgecolor="#8a8f98", linewidth=1.1 * pt))
    for s in pic.shapes:
        ax.add_patch(FancyBboxPatch((s.x, s.y), s.w, s.h, boxstyle=f"round,pad=0,rounding_size={s.rx}", linewidth=1.2 * pt,
                                    facecolor=s.fill, edgecolor=s.stroke, hatch="//" if s.hatched else None, hatchcolor="#b0b0b0",
                                    linestyle="--" if s.hatched else "-"))
        mid = s.y + s.h / 2
        if s.centred:
            ax.text(s.x + s.w / 2, mid, s.text, ha="center", va="center", **font)
        else:
            ax.text(s.x + 6, mid, s.text, ha="left", va="center", **font)
        if s.note:
            ax.text(s.x + s.w - 6, mid, s.note, ha="right", va="center", color="#333333", **font)
    for t in pic.texts:
        ax.text(t.x, t.y, t.text, ha="left", va="baseline", weight="bold" if t.bold else "normal",
                **{**font, "fontsize": t.size * pt})
    fig.savefig(path, dpi=dpi, facecolor="white")
    plt.close(fig)
    return Path(path)


def draw_widths(report: Report, path: str | Path) -> Path:
    """Horizontal bars of every layer's output channels, before and after pruning, one row per layer."""
    plt = _pyplot()
    rows = [r for r in report.rows if r.out_channels[0] is not None][::-1]
    fig, ax = plt.subplots(figsize=(8.0, max(3.0, 0.16 * len(rows) + 1.0)))
    ys = range(len(rows))
    ax.barh(ys, [r.out_channels[0] for r in rows], color="#c9d7ea", label="before")
    ax.barh(ys, [r.out_channels[1] for r in rows], color="#2b6cb0", label="after")
    ax.set_yticks(list(ys), [r.name for r in rows], fontsize=7, family="monospace")
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlabel("output channels")
    f0, f1 = report.flops
    ax.set_title(f"per-layer width: {f0 / 1e9:.3g} -> {f1 / 1e9:.3g} GFLOPs")
    ax.legend(loc="lower right")
    fig.savefig(path, bbox_inches="tight", dpi=110)
    plt.close(fig)
    return Path(path)


def draw_history(history: Any, path: str | Path) -> Path:
    """Metric against GFLOPs over the steps of a ``History`` (step numbers as labels)."""
    points = [s for s in history.steps if s.metric is not None]
    if not points:
        raise ArgumentError("the history has no metric to plot: pass evaluate= to prune_iteratively")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([s.gflops for s in points], [s.metric for s in points], marker="o")
    for s in points:
        ax.annotate(str(s.step), (s.gflops, s.metric), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.invert_xaxis()
    ax.set_xlabel("GFLOPs")
    ax.set_ylabel("metric")
    ax.set_title(f"{history.selector}{' (coarse ranking)' if history.coarse else ''}: metric per step")
    ax.grid(alpha=0.3)
    fig.savefig(path, bbox_inches="tight", dpi=110)
    plt.close(fig)
    return Path(path)


def write_report_dir(report: Report, directory: str | Path, picture: Picture | None = None, title: str = "") -> list[Path]:
    """``report.md``, ``report.json``, ``widths.png`` and ``report.html`` (with ``picture``, the groups drawn
    by ``picture.model_picture``) in ``directory``, created if needed."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    md, js, page = directory / "report.md", directory / "report.json", directory / "report.html"
    md.write_text(report.to_markdown())
    js.write_text(json.dumps(report.to_dict(), indent=1))
    page.write_text(report_page(report, picture, title), encoding="utf-8")
    return [md, js, draw_widths(report, directory / "widths.png"), page]
