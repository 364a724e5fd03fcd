"""Drawings for people: the dependency graph, per-layer widths, and a report folder.

The dependency graph is drawn by graphviz's ``dot`` when it is installed, otherwise with networkx and
matplotlib (``pip install fxprune[plot]``): one coloured box per group (grey, with the reason, when
frozen), joined to the parameter dimensions it owns.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

from .errors import ArgumentError
from .graph import DependencyGraph
from .report import Report

__all__ = ["draw_groups", "draw_widths", "draw_history", "write_report_dir"]

_IMAGE = (".svg", ".png", ".pdf")


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ArgumentError("drawing needs matplotlib: pip install 'fxprune[plot]'") from exc
    return plt


def draw_groups(graph: DependencyGraph, path: str | Path) -> Path:
    """Write the dependency graph to ``path``: ``.dot`` text, or an ``.svg``/``.png``/``.pdf`` image."""
    path = Path(path)
    if path.suffix == ".dot":
        path.write_text(graph.to_dot())
        return path
    if path.suffix not in _IMAGE:
        raise ArgumentError(f"cannot draw to {path}: use a .dot, .svg, .png or .pdf file name")
    dot = shutil.which("dot")
    if dot:
        subprocess.run([dot, f"-T{path.suffix[1:]}", "-o", str(path)], input=graph.to_dot(), text=True, check=True)
        return path
    return _draw_with_matplotlib(graph, path)


def _draw_with_matplotlib(graph: DependencyGraph, path: Path) -> Path:
    import networkx as nx

    plt = _pyplot()
    g = graph.to_networkx()
    pos = nx.spring_layout(g, seed=0, k=1.5 / math.sqrt(max(g.number_of_nodes(), 1)))
    side = max(8.0, math.sqrt(g.number_of_nodes()) * 1.2)
    fig, ax = plt.subplots(figsize=(side, side))
    groups = [n for n in g if n[0] == "group"]
    members = [n for n in g if n[0] == "member"]
    colours = plt.get_cmap("tab20")
    nx.draw_networkx_edges(g, pos, ax=ax, alpha=0.3, width=0.6)
    nx.draw_networkx_nodes(g, pos, nodelist=members, node_size=12, node_color="#777777", ax=ax)
    nx.draw_networkx_nodes(
        g, pos, nodelist=groups, node_shape="s", node_size=260, ax=ax,
        node_color=["#d0d0d0" if g.nodes[n]["frozen"] else colours(n[1] % 20) for n in groups],
    )
    labels = {
        n: f"{n[1]}: " + (f"frozen ({g.nodes[n]['frozen'][0][:40]})" if g.nodes[n]["frozen"] else f"width {g.nodes[n]['width']}")
        for n in groups
    }
    nx.draw_networkx_labels(g, pos, labels=labels, font_size=6, ax=ax)
    ax.set_title(f"{len(groups)} channel groups ({len(graph.prunable_groups)} prunable); grey: frozen")
    ax.axis("off")
    fig.savefig(path, bbox_inches="tight", dpi=110)
    plt.close(fig)
    return path


def draw_widths(report: Report, path: str | Path) -> Path:
    """Bar chart of every layer's output channels, before and after pruning."""
    plt = _pyplot()
    rows = [r for r in report.rows if r.out_channels[0] is not None]
    fig, ax = plt.subplots(figsize=(max(8.0, 0.12 * len(rows)), 4.5))
    xs = range(len(rows))
    ax.bar(xs, [r.out_channels[0] for r in rows], color="#c9d7ea", label="before")
    ax.bar(xs, [r.out_channels[1] for r in rows], color="#2b6cb0", label="after")
    ax.set_xticks(list(xs), [r.name for r in rows], rotation=90, fontsize=5)
    ax.set_ylabel("output channels")
    f0, f1 = report.flops
    ax.set_title(f"per-layer width: {f0 / 1e9:.3g} -> {f1 / 1e9:.3g} GFLOPs")
    ax.legend()
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


def write_report_dir(report: Report, directory: str | Path) -> list[Path]:
    """``report.md``, ``report.json`` and ``widths.png`` in ``directory`` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    md, js = directory / "report.md", directory / "report.json"
    md.write_text(report.to_markdown())
    js.write_text(json.dumps(report.to_dict(), indent=1))
    return [md, js, draw_widths(report, directory / "widths.png")]
