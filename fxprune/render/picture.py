"""Where each box, line and word of a dependency-group drawing goes; the SVG and matplotlib renderers
only draw what this module places, so the HTML report and ``fxprune inspect --png/--svg`` show one picture.

Blocks (inputs, layers, joins; ``dataflow.blocks``) are laid out top to bottom in data-flow order: a
block's row is one more than its deepest predecessor's, so parallel branches (a residual shortcut, the
two expand convs of a Fire module) sit side by side in one row and a residual stage reads downwards. A
layer is labelled with its name, its width (before -> after in a report) and its group ``gN``, and is
filled with its group's colour: boxes of one colour lose the same channels. Frozen groups are hatched
grey and name their reason. A line that skips rows runs down a free column or a lane left of the boxes.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch.fx

from ..core.dataflow import Block, blocks as dataflow_blocks
from ..core.groups import DependencyGraph, Group
from ..report import Report

__all__ = ["Shape", "Text", "Edge", "Picture", "picture", "model_picture", "FONT", "FONT_NAME", "PALETTE", "FROZEN"]

FONT = 11.0  # px; labels are monospace, so a label's width is known before any renderer runs
FONT_NAME = "DejaVu Sans Mono"  # the face the widths are measured for (matplotlib ships it)
_CHAR = 0.61 * FONT
_BOX_H, _ROW, _COL_GAP, _LANE, _MARGIN = 20.0, 32.0, 28.0, 9.0, 16.0
_MAX_CHARS = 58
PALETTE = ("#0067a5", "#f38400", "#008856", "#be0032", "#f3c300", "#875692", "#a1caf1", "#8db600", "#e68fac", "#882d17",
           "#1b9e9e", "#c2b280")  # after Kelly's colours of maximum contrast, without grey (grey means frozen)
FROZEN = ("#ececec", "#6b6b6b")  # fill, outline
_SP = "\u00a0\u00a0"  # two no-break spaces between a label's parts: SVG text collapses plain runs of spaces
_JOIN = {"add": "+", "iadd": "+", "sub": "-", "mul": "×", "imul": "×", "cat": "cat", "concat": "cat", "stack": "stack"}


@dataclass(frozen=True)
class Shape:
    """A box (``rx`` rounds its corners) with one line of text; ``tip`` is shown on hover."""

    x: float
    y: float
    w: float
    h: float
    text: str
    fill: str
    stroke: str
    note: str = ""  # drawn right-aligned in the box
    hatched: bool = False
    rx: float = 3.0
    centred: bool = False
    group: int | None = None
    tip: str = ""


@dataclass(frozen=True)
class Text:
    """A line of free text (title, legend)."""

    x: float
    y: float  # baseline
    text: str
    size: float = FONT
    bold: bool = False


@dataclass(frozen=True)
class Edge:
    """A line through ``points``: a cubic curve (start, two control points, end) or a polyline."""

    points: tuple[tuple[float, float], ...]
    curved: bool


@dataclass
class Picture:
    """Everything to draw, in pixels from the top left corner."""

    width: float
    height: float
    shapes: list[Shape] = field(default_factory=list)
    edges: list[Edge] = field(default_factory=list)
    texts: list[Text] = field(default_factory=list)


def _fit(text: str, chars: int = _MAX_CHARS) -> str:
    """``text`` cut to ``chars`` characters (an ellipsis marks the cut); the hover text keeps it whole."""
    return text if len(text) <= chars else text[: chars - 1] + "…"


def _mix(colour: str, t: float) -> str:
    """``colour`` moved a fraction ``t`` towards white (t > 0) or black (t < 0)."""
    rgb = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
    end = 255 if t > 0 else 0
    return "#" + "".join(f"{round(c + (end - c) * abs(t)):02x}" for c in rgb)


def _tint(colour: str) -> tuple[str, str]:
    """A box's fill (light, so dark text stays readable) and outline (dark) in ``colour``."""
    return _mix(colour, 0.55), _mix(colour, -0.25)


def _colours(blocks: list[Block], deps: DependencyGraph) -> dict[int, str]:
    """A palette colour per group, the least recently used one for each group met in data-flow order, so
    that groups near each other differ."""
    order = [gid for b in blocks for gid in b.groups] + [g.id for g in deps.groups]
    order = [gid for gid in order if not deps.groups[gid].frozen]  # frozen groups are grey
    used: dict[str, int] = {c: -1 for c in PALETTE}
    out: dict[int, str] = {}
    for step, gid in enumerate(order):
        if gid not in out:
            out[gid] = min(PALETTE, key=lambda c: used[c])
        used[out[gid]] = step  # a group met again (a residual stream) keeps its colour out of use nearby
    return out


def _widths(before: int | None, after: int | None) -> str:
    """"64→32", or "64" when unchanged or not pruned."""
    if before is None:
        return ""
    return str(before) if after is None or after == before else f"{before}→{after}"


def _rows_and_columns(blocks: list[Block]) -> tuple[list[int], list[int]]:
    """Each block's row (one below its deepest predecessor) and column (ordered by where its predecessors sit)."""
    rank: list[int] = []
    for b in blocks:
        rank.append(1 + max((rank[p] for p in b.preds), default=-1))
    col = [0] * len(blocks)
    by_rank: dict[int, list[int]] = defaultdict(list)
    for i, r in enumerate(rank):
        by_rank[r].append(i)
    for r in sorted(by_rank):
        def centre(i: int) -> float:
            ps = blocks[i].preds
            return sum(col[p] for p in ps) / len(ps) if ps else 0.0
        for c, i in enumerate(sorted(by_rank[r], key=lambda i: (centre(i), i))):
            col[i] = c
    return rank, col


def _tracks(blocks: list[Block], rank: list[int], col: list[int]) -> dict[tuple[int, int], tuple[str, int]]:
    """For each edge that skips rows, the vertical track it runs down: its source's column where no box
    and no other such edge is in the way, else the first free lane left of the boxes."""
    occupied = {(rank[i], col[i]) for i in range(len(blocks))}
    busy: dict[tuple[str, int], list[tuple[int, int]]] = defaultdict(list)
    out = {}
    for t, b in enumerate(blocks):
        for s in b.preds:
            lo, hi = rank[s], rank[t]
            if hi - lo < 2:
                continue
            def free(key: tuple[str, int], lo: int = lo, hi: int = hi) -> bool:
                return all(hi <= start or end <= lo for start, end in busy[key])

            key = ("col", col[s])
            if any((r, col[s]) in occupied for r in range(lo + 1, hi)) or not free(key):
                key = next(("lane", k) for k in range(len(blocks)) if free(("lane", k)))
            busy[key].append((lo, hi))
            out[(s, t)] = key
    return out


def picture(blocks: list[Block], deps: DependencyGraph, after: dict[str, int] | None = None, title: str = "") -> Picture:
    """Place ``blocks`` (widths after pruning from ``after``, by layer name; None for an unpruned model)."""
    colours = _colours(blocks, deps)
    rank, col = _rows_and_columns(blocks)
    tracks = _tracks(blocks, rank, col)
    lanes = 1 + max((k for kind, k in tracks.values() if kind == "lane"), default=-1)
    labels = [_label(b, deps, after) for b in blocks]
    box_w = _CHAR * max([len(t) + 2 + len(n) for t, n in labels if t] + [24]) + 12
    pic = Picture(0.0, 0.0)
    top = _legend(pic, blocks, deps, colours, after, title)
    left = _MARGIN + lanes * _LANE + (8 if lanes else 0)
    x = [left + c * (box_w + _COL_GAP) for c in col]
    y = [top + r * _ROW for r in rank]
    for i, b in enumerate(blocks):
        pic.shapes.append(_shape(b, labels[i], x[i], y[i], box_w, deps, colours, after))
    for t, b in enumerate(blocks):
        for s in b.preds:
            sx, sy, tx, ty = x[s] + box_w / 2, y[s] + _BOX_H, x[t] + box_w / 2, y[t]
            kind, k = tracks.get((s, t), ("", 0))
            if not kind:
                mid = (sy + ty) / 2
                pic.edges.append(Edge(((sx, sy), (sx, mid), (tx, mid), (tx, ty)), True))
                continue
            vx = sx if kind == "col" else left - 8 - k * _LANE
            gap_s, gap_t = sy + (_ROW - _BOX_H) / 2, ty - (_ROW - _BOX_H) / 2
            pic.edges.append(Edge(((sx, sy), (sx, gap_s), (vx, gap_s), (vx, gap_t), (tx, gap_t), (tx, ty)), False))
    pic.width = max([s.x + s.w for s in pic.shapes] + [t.x + 0.61 * t.size * len(t.text) for t in pic.texts]) + _MARGIN
    pic.height = max(s.y + s.h for s in pic.shapes) + _MARGIN
    return pic


def model_picture(gm: torch.fx.GraphModule, deps: DependencyGraph, report: Report | None = None, title: str = "") -> Picture:
    """The picture of a captured, coupled model; widths after pruning from ``report``'s rows (by layer name)."""
    after = {r.name: r.out_channels[1] for r in report.rows if r.out_channels[1] is not None} if report else None
    return picture(dataflow_blocks(gm, deps), deps, after, title)


def _label(b: Block, deps: DependencyGraph, after: dict[str, int] | None) -> tuple[str, str]:
    """A layer's or input's name, and its width, group and frozen reason (a join is a symbol instead: empty)."""
    if b.kind == "join":
        return "", ""
    note = _widths(b.width, (after or {}).get(b.name)) + (f"{_SP}g{b.groups[0]}" if b.groups else "")
    frozen = deps.groups[b.groups[0]].frozen if b.groups else ()
    return _fit(b.name, 40), _fit(note + (f"{_SP}frozen: {frozen[0]}" if frozen else ""), 44)


def _tip(b: Block, deps: DependencyGraph, after: dict[str, int] | None) -> str:
    """Hover text: the block's name, op, width and every group it belongs to with its state."""
    lines = [f"{b.name} ({b.op})"]
    if b.width is not None:
        lines.append(f"width {_widths(b.width, (after or {}).get(b.name))} channels")
    lines += [_about(deps.groups[gid], deps) for gid in b.groups]
    return "\n".join(lines)


def _about(g: Group, deps: DependencyGraph) -> str:
    """One line on a group: id, channels, members, prunable or why frozen."""
    return f"group g{g.id}: {deps.channels(g)} channels, {len(g.members)} members, {g.status}"


def _style(gid: int | None, deps: DependencyGraph, colours: dict[int, str]) -> tuple[str, str, bool]:
    """Fill, outline and hatching of a box of group ``gid`` (None: of several groups, drawn white)."""
    if gid is None:
        return "#ffffff", "#555555", False
    if deps.groups[gid].frozen:
        return *FROZEN, True
    return *_tint(colours[gid]), False


def _shape(b: Block, label: tuple[str, str], x: float, y: float, box_w: float, deps: DependencyGraph, colours: dict[int, str],
           after: dict[str, int] | None) -> Shape:
    """The box of ``b`` in the column slot at (x, y): a layer fills the slot, a join is a pill in its middle."""
    gid = b.groups[0] if len(b.groups) == 1 or (b.groups and b.kind != "join") else None
    fill, stroke, frozen = _style(gid, deps, colours)
    tip = _tip(b, deps, after)
    if b.kind == "join":
        sym = _JOIN.get(b.op, b.op)
        w = max(_BOX_H, _CHAR * len(sym) + 10)
        return Shape(x + (box_w - w) / 2, y, w, _BOX_H, sym, fill, stroke, "", frozen, _BOX_H / 2, True, gid, tip)
    return Shape(x, y, box_w, _BOX_H, label[0], fill, stroke, label[1], frozen, 3.0, False, gid, tip)


def _legend(pic: Picture, blocks: list[Block], deps: DependencyGraph, colours: dict[int, str],
            after: dict[str, int] | None, title: str) -> float:
    """Title, a key and one chip per group in its colour, at the top of ``pic``; returns where boxes start."""
    y = _MARGIN
    if title:
        pic.texts.append(Text(_MARGIN, y + 13, title, FONT + 3, True))
        y += 26
    key = [(f"layer{_SP}64→32{_SP}g5", "#c5d5e6", "#3a5a7d", False, "a layer: its channels (before→after) and its group gN; "
            "one colour = one group, whose channels are removed together"),
           ("frozen", *FROZEN, True, "a frozen group: kept whole, for the reason shown"),
           ("+", "#ffffff", "#555555", False, "where outputs meet: + add, × multiply, cat concatenate")]
    for text, fill, stroke, hatched, meaning in key:
        w = _CHAR * len(text) + 12
        pic.shapes.append(Shape(_MARGIN, y, w, _BOX_H, text, fill, stroke, "", hatched, _BOX_H / 2 if text == "+" else 3.0, True))
        pic.texts.append(Text(_MARGIN + w + 8, y + 14, meaning))
        y += _BOX_H + 6
    widths: dict[int, int] = {}
    for b in blocks:
        if b.kind == "layer" and len(b.groups) == 1 and after and b.name in after:
            widths.setdefault(b.groups[0], after[b.name])
    x, y, right = _MARGIN, y + 6, _MARGIN + 760
    for g in deps.groups:
        text = f"g{g.id}{_SP}{_widths(deps.channels(g), widths.get(g.id))} ch" + (f"{_SP}frozen: {g.frozen[0]}" if g.frozen else "")
        w = _CHAR * len(_fit(text, 40)) + 12
        if x + w > right and x > _MARGIN:
            x, y = _MARGIN, y + _BOX_H + 4
        fill, stroke, frozen = _style(g.id, deps, colours)
        members = ", ".join(str(m) for m in g.members[:6]) + (" ..." if len(g.members) > 6 else "")
        pic.shapes.append(Shape(x, y, w, _BOX_H, _fit(text, 40), fill, stroke, "", frozen, 3.0, False, g.id,
                                f"{_about(g, deps)}\nmembers: {members}"))
        x += w + 6
    return y + _BOX_H + 22

