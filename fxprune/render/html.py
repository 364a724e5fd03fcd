"""Self-contained HTML pages: the report of a pruning, and the dependency groups of a model.

Everything is inline (styles, a short script, SVG drawings from ``svg.py``): a page opens from disk
with no network. The script sorts tables when a header is clicked (``#sort=KEY`` or ``#sort=-KEY`` in
the address sorts on load, e.g. ``report.html#sort=-flops``) and, on hover, outlines every box of the
group under the pointer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from html import escape
from importlib.resources import files
from typing import Any

from ..core.groups import DependencyGraph
from .picture import Picture
from ..report import Report, si
from .svg import picture_svg, widths_svg

__all__ = ["report_page", "groups_page"]

_STYLE = (files(__package__) / "report.css").read_text()
_SCRIPT = (files(__package__) / "report.js").read_text()

Cell = tuple[str, Any]  # (shown text, sort value)


def _pair(pair: Sequence[Any], fmt: Callable[[Any], str] = str) -> Cell:
    """``before → after`` (one number when equal), sorted by the value after."""
    a, b = pair
    if a is None:
        return "-", -1
    return (fmt(a) if a == b else f"{fmt(a)} → {fmt(b)}"), (a if b is None else b)


def _table(headers: Sequence[tuple[str, str, bool]], rows: Sequence[Sequence[Cell]], foot: Sequence[str] = (), table_id: str = "") -> str:
    """A sortable table; ``headers`` are (text, key for ``#sort=``, numeric)."""
    kinds = ["num" if num else "text" for _, _, num in headers]
    ths = "".join(f'<th class="{t}" data-key="{k}" data-type="{t}" aria-sort="none">{escape(h)}</th>' for (h, k, _), t in zip(headers, kinds))
    body = "\n".join("<tr>" + "".join(f'<td class="{t}" data-v="{escape(str(v))}">{escape(s)}</td>' for (s, v), t in zip(row, kinds))
                      + "</tr>" for row in rows)
    tfoot = "<tfoot><tr>" + "".join(f"<td>{escape(t)}</td>" for t in foot) + "</tr></tfoot>" if foot else ""
    ident = f' id="{table_id}"' if table_id else ""
    return f'<div class="scroll"><table class="sortable"{ident}><thead><tr>{ths}</tr></thead><tbody>\n{body}\n</tbody>{tfoot}</table></div>'


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{_STYLE}</style></head>\n<body>\n{body}\n<script>{_SCRIPT}</script>\n</body></html>\n")


def _change(a: float, b: float) -> str:
    return "" if a == b or not a else f"{100 * (b - a) / a:+.1f}%"


def _totals(report: Report) -> str:
    rows = [("FLOPs (conv, linear, matmul)", *report.flops), ("MACs", *report.macs), ("parameters", *report.params),
            ("other ops, FLOPs (estimate)", *report.other_flops)]
    cells = [f"<tr><td>{escape(n)}</td><td>{si(a)}</td><td>{si(b)}</td><td>{_change(a, b)}</td></tr>" for n, a, b in rows]
    if report.latency:
        t = report.latency
        interval = f" ({t['interval'][0]:.3g}-{t['interval'][1]:.3g}x, {t['confidence']:.0%})" if "interval" in t else ""
        cells.append(f"<tr><td>latency, ms (measured)</td><td>{t['before_ms']:.4g}</td><td>{t['after_ms']:.4g}</td>"
                     f"<td>{t['speedup']:.3g}x faster{interval}</td></tr>")
    return ("<table><thead><tr><th>total</th><th>before</th><th>after</th><th>change</th></tr></thead><tbody>"
            + "".join(cells) + "</tbody></table>")


def _layers(report: Report) -> str:
    ms = report.estimated_ms() or None
    headers = [("layer", "layer", False), ("op", "op", False), ("in ch", "in", True), ("out ch", "out", True),
               ("params", "params", True), ("MACs", "macs", True), ("FLOPs", "flops", True), ("FLOPs removed", "removed", True)]
    rows = []
    for r in report.rows:
        f0, f1 = r.flops
        gone = 100 * (f0 - f1) / f0 if f0 else 0.0
        row = [(r.name, r.name), (r.op, r.op), _pair(r.in_channels), _pair(r.out_channels), _pair(r.params, si),
               _pair(r.macs, si), _pair(r.flops, si), (f"{gone:.1f}%" if f0 else "-", gone)]
        if ms is not None:
            cell = _pair(ms[r.name], lambda v: f"{v:.3g}") if r.name in ms else ("-", -1)
            row.append((cell[0] + " *", cell[1]) if r.name in ms and ms[r.name][1] > ms[r.name][0] else cell)
        rows.append(row)
    f0, f1 = report.flops
    foot = ["total", "", "", "", _pair(report.params, si)[0], _pair(report.macs, si)[0], _pair(report.flops, si)[0],
            f"{100 * (f0 - f1) / f0:.1f}%" if f0 else "-"]
    if ms is not None:
        headers.append(("est. ms (layer alone)", "ms", True))
        foot.append(_pair(report.estimated_total(), lambda v: f"{v:.3g}")[0])
    return _table(headers, rows, foot, "layers-table")


_PICTURE_HINT = ("Layers in data-flow order, top to bottom; parallel branches side by side. Boxes of one colour form one "
                 "channel group: they lose the same channels. Hover a box for its group, width and reason; the group's "
                 "other boxes stay lit.")


def report_page(report: Report, picture: Picture | None, title: str = "") -> str:
    """The report as one HTML page: totals, the sortable layer table, the widths chart and the groups picture."""
    heading = f"fxprune report{': ' + title if title else ''}"
    notes = "".join(f"<li>{escape(n)}</li>" for n in report.all_notes())
    sections = [
        f"<h1>{escape(heading)}</h1>",
        '<nav><a href="#totals">totals</a><a href="#layers">layers</a><a href="#widths">widths</a>'
        + ('<a href="#groups">channel groups</a>' if picture else "") + "</nav>",
        f'<section id="totals"><h2>Totals</h2>{_totals(report)}' + (f'<ul class="notes">{notes}</ul>' if notes else "") + "</section>",
        '<section id="layers"><h2>Layers</h2><p class="hint">Click a column header to sort (numbers sort by their value '
        f"after pruning); the totals stay at the bottom.</p>{_layers(report)}</section>",
        f'<section id="widths"><h2>Widths</h2><div class="scroll">{widths_svg(report)}</div></section>',
    ]
    if picture is not None:
        sections.append(f'<section id="groups"><h2>Channel groups</h2><p class="hint">{_PICTURE_HINT}</p>'
                        f'<div class="scroll">{picture_svg(picture)}</div></section>')
    return _page(heading, "\n".join(sections))


def groups_page(deps: DependencyGraph, picture: Picture, title: str = "") -> str:
    """The dependency groups of an unpruned model as one HTML page: the picture and a sortable group table."""
    heading = f"fxprune groups{': ' + title if title else ''}"
    headers = [("group", "group", True), ("channels", "channels", True), ("members", "members", True),
               ("status", "status", False), ("members (first six)", "first", False)]
    rows = []
    for g in deps.groups:
        first = ", ".join(str(m) for m in g.members[:6]) + (" ..." if len(g.members) > 6 else "")
        channels = deps.channels(g)
        rows.append([(f"g{g.id}", g.id), (str(channels), channels), (str(len(g.members)), len(g.members)), (g.status, g.status), (first, first)])
    body = (f"<h1>{escape(heading)}</h1><p>{len(deps.groups)} channel groups, {len(deps.prunable_groups)} prunable.</p>"
            f'<h2>Picture</h2><p class="hint">{_PICTURE_HINT}</p><div class="scroll">{picture_svg(picture)}</div>'
            f"<h2>Groups</h2>{_table(headers, rows)}")
    return _page(heading, body)
