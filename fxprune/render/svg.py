"""SVG text, written by hand (no plotting library needed): a ``picture.Picture`` and a per-layer widths chart.

Both are self-contained ``<svg>`` elements: no external fonts, scripts or styles, so they can be saved
as files or inlined in an HTML page. Every box carries a ``<title>`` (shown on hover) and, when it
belongs to a group, ``data-group`` (the HTML report highlights a group's boxes together).
"""

from __future__ import annotations

from html import escape

from .picture import FONT, FONT_NAME, Picture
from ..report import Report

__all__ = ["picture_svg", "widths_svg"]

FONT_FAMILY = f"'{FONT_NAME}', Menlo, Consolas, monospace"
_HATCH = ('<pattern id="fxprune-hatch" patternUnits="userSpaceOnUse" width="6" height="6" patternTransform="rotate(45)">'
          '<rect width="6" height="6" fill="#ececec"/><line x1="0" y1="0" x2="0" y2="6" stroke="#b0b0b0" stroke-width="2.2"/>'
          "</pattern>")


def _num(v: float) -> str:
    return f"{v:.1f}".rstrip("0").rstrip(".")


def _open(width: float, height: float, css_class: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="{css_class}" width="{_num(width)}" height="{_num(height)}" '
            f'viewBox="0 0 {_num(width)} {_num(height)}" font-family="{escape(FONT_FAMILY)}" font-size="{_num(FONT)}">')


def picture_svg(pic: Picture) -> str:
    """``pic`` as one ``<svg>`` element: edges under boxes, each box with its label and hover text."""
    out = [_open(pic.width, pic.height, "fxprune-groups"), f"<defs>{_HATCH}</defs>",
           f'<rect width="{_num(pic.width)}" height="{_num(pic.height)}" fill="#ffffff"/>', '<g fill="none" stroke="#8a8f98" stroke-width="1.1">']
    for e in pic.edges:
        p = [f"{_num(x)},{_num(y)}" for x, y in e.points]
        d = f"M{p[0]} C{p[1]} {p[2]} {p[3]}" if e.curved else "M" + " L".join(p)
        out.append(f'<path d="{d}"/>')
    out.append("</g>")
    for s in pic.shapes:
        group = f' data-group="{s.group}"' if s.group is not None else ""
        fill = "url(#fxprune-hatch)" if s.hatched else s.fill
        dash = ' stroke-dasharray="4 2"' if s.hatched else ""
        tx, anchor = (s.x + s.w / 2, "middle") if s.centred else (s.x + 6, "start")
        out.append(
            f'<g class="box"{group}>' + (f"<title>{escape(s.tip)}</title>" if s.tip else "")
            + f'<rect x="{_num(s.x)}" y="{_num(s.y)}" width="{_num(s.w)}" height="{_num(s.h)}" rx="{_num(s.rx)}" '
            f'fill="{fill}" stroke="{s.stroke}" stroke-width="1.2"{dash}/>'
            f'<text x="{_num(tx)}" y="{_num(s.y + s.h / 2 + FONT * 0.36)}" text-anchor="{anchor}" fill="#1d1d1d">{escape(s.text)}</text>'
            + (f'<text x="{_num(s.x + s.w - 6)}" y="{_num(s.y + s.h / 2 + FONT * 0.36)}" text-anchor="end" fill="#333333">'
               f"{escape(s.note)}</text>" if s.note else "") + "</g>"
        )
    for t in pic.texts:
        weight = ' font-weight="bold"' if t.bold else ""
        out.append(f'<text x="{_num(t.x)}" y="{_num(t.y)}" font-size="{_num(t.size)}"{weight} fill="#1d1d1d">{escape(t.text)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def widths_svg(report: Report) -> str:
    """Horizontal bars, one row per layer with output channels: before (light) under after (dark)."""
    rows = [r for r in report.rows if r.out_channels[0] is not None]
    char, pitch, bar_w = 0.61 * FONT, 15.0, 420.0
    name_w = char * max([len(r.name) for r in rows] + [5]) + 10
    top, widest = 40.0, max([r.out_channels[0] for r in rows] + [1])
    width, height = name_w + bar_w + char * 12 + 20, top + pitch * len(rows) + 12
    out = [_open(width, height, "fxprune-widths"), f'<rect width="{_num(width)}" height="{_num(height)}" fill="#ffffff"/>',
           f'<rect x="{_num(name_w)}" y="8" width="14" height="10" fill="#c9d7ea"/><text x="{_num(name_w + 20)}" y="17">before</text>',
           f'<rect x="{_num(name_w + 90)}" y="8" width="14" height="10" fill="#2b6cb0"/><text x="{_num(name_w + 110)}" y="17">after</text>',
           f'<text x="{_num(name_w + 170)}" y="17" fill="#555555">output channels per layer, in graph order</text>']
    for i, r in enumerate(rows):
        y = top + i * pitch
        b, a = r.out_channels
        after = b if a is None else a
        tip = f"{r.name} ({r.op}): {b}" + (f" → {after} channels" if after != b else " channels")
        out.append(
            f'<g class="bar"><title>{escape(tip)}</title>'
            f'<text x="{_num(name_w - 6)}" y="{_num(y + 10)}" text-anchor="end">{escape(r.name)}</text>'
            f'<rect x="{_num(name_w)}" y="{_num(y + 1)}" width="{_num(bar_w * b / widest)}" height="11" fill="#c9d7ea"/>'
            f'<rect x="{_num(name_w)}" y="{_num(y + 1)}" width="{_num(bar_w * after / widest)}" height="11" fill="#2b6cb0"/>'
            f'<text x="{_num(name_w + bar_w * b / widest + 5)}" y="{_num(y + 10)}" fill="#444444">'
            f'{b if after == b else f"{b}→{after}"}</text></g>'
        )
    out.append("</svg>")
    return "\n".join(out)
