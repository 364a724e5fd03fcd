"""Report: the per-layer FLOP/parameter table of one pruning, before -> after."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from tabulate import tabulate

__all__ = ["Report", "LayerRow", "latency_summary"]


@dataclass
class LayerRow:
    name: str
    op: str
    in_channels: tuple[int | None, int | None]
    out_channels: tuple[int | None, int | None]
    params: tuple[int, int]
    macs: tuple[int, int]

    @property
    def flops(self) -> tuple[int, int]:
        return (2 * self.macs[0], 2 * self.macs[1])

    def then(self, later: LayerRow) -> LayerRow:
        """This row's "before" and ``later``'s "after": one row for two prunings in a row."""
        return LayerRow(later.name, later.op, *_spans(self, later, ("in_channels", "out_channels", "params", "macs")))


def _spans(first: Any, later: Any, fields: tuple[str, ...]) -> list[tuple[Any, Any]]:
    """(first's "before", later's "after") for each of ``fields``, (before, after) pairs of two reports or rows."""
    return [(getattr(first, f)[0], getattr(later, f)[1]) for f in fields]


def _arrow(pair: tuple[Any, Any], fmt: Any = str) -> str:
    a, b = pair
    if a is None:
        return "-"
    return fmt(a) if a == b else f"{fmt(a)} -> {fmt(b)}"


def _ms(v: float) -> str:
    return f"{v:.3g}"


def si(n: float) -> str:
    """``n`` in three significant digits with a K/M/G suffix: 999.6e6 is 1.00G, not 1000M."""
    rounded = float(f"{n:.3g}")
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(rounded) >= size:
            return f"{rounded / size:#.3g}".rstrip(".") + unit
    return str(int(n))


def latency_summary(t: dict[str, Any]) -> str:
    """One line on what a latency target measured: the medians, the speed-up with its interval, the
    machine's noise and where it was measured."""
    when = f"; found in the timing cache at {t['cached_speedup']:.3g}x and timed again now" if t.get("cached_speedup") else ""
    interval = ""
    if "interval" in t:
        lo, hi = t["interval"]
        interval = (f", {t['confidence']:.0%} interval {lo:.3g}-{hi:.3g}x over {t['comparison_rounds']} rounds in turns with the "
                    f"original, which varied by {t['noise']:.1%} against itself")
    return (f"latency measured {t['before_ms']:.4g} ms -> {t['after_ms']:.4g} ms ({t['speedup']:.3g}x faster{interval}; batch "
            f"{t['batch']}, {t['device']}, {t['threads']} threads, {t['dtype']}{when})")


@dataclass
class Report:
    """Per-layer and total channels, parameters, MACs and FLOPs (FLOPs = 2 x MACs), before -> after.

    ``macs``/``flops`` count conv, linear and matmul work exactly as FlopCounterMode does. ``other_flops``
    is a separate estimate for everything else (one FLOP per output element of element-wise,
    normalization and pooling ops).
    """

    rows: list[LayerRow]
    params: tuple[int, int]
    macs: tuple[int, int]
    other_flops: tuple[int, int]
    notes: list[str] = field(default_factory=list)
    latency: dict[str, Any] | None = None  # what a latency target measured (targets/latency.py)

    @property
    def flops(self) -> tuple[int, int]:
        return (2 * self.macs[0], 2 * self.macs[1])

    def _table(self, fmt: str) -> str:
        body = [
            [r.name, r.op, _arrow(r.in_channels), _arrow(r.out_channels), _arrow(r.params, si),
             _arrow(r.macs, si), _arrow(r.flops, si)]
            for r in self.rows
        ]
        body.append(["total", "", "", "", _arrow(self.params, si), _arrow(self.macs, si), _arrow(self.flops, si)])
        headers = ["layer", "op", "in ch", "out ch", "params", "MACs", "FLOPs"]
        layers = self.estimated_ms()
        if layers:  # estimated per layer from its timings; the measured whole model is in the summary
            for row, r in zip(body, self.rows):
                pair = layers.get(r.name)
                row.append("-" if pair is None else _arrow(pair, _ms) + (" *" if pair[1] > pair[0] else ""))
            body[-1].append(_arrow(self.estimated_total(), _ms))
            headers.append("est. ms")
        return tabulate(body, headers=headers, tablefmt=fmt)

    def estimated_ms(self) -> dict[str, tuple[float, float]]:
        """Each conv and linear layer's milliseconds before -> after as the latency model estimates them
        (the layer timed alone at its widths); empty without a latency target."""
        return {k: (v[0], v[1]) for k, v in ((self.latency or {}).get("layers_ms") or {}).items()}

    def estimated_total(self) -> tuple[float, float]:
        """The sum of the rows' estimates, before and after."""
        estimated = self.estimated_ms()
        layers = [estimated[r.name] for r in self.rows if r.name in estimated]
        return sum(b for b, _ in layers), sum(a for _, a in layers)

    def all_notes(self) -> list[str]:
        """The notes, and what the estimated column means next to the measured latency."""
        layers = self.estimated_ms()
        if not layers:
            return self.notes
        (b, a), t = self.estimated_total(), self.latency
        out = [f"est. ms: the latency model's estimate of each conv and linear layer, timed alone at its widths; the rows add up "
               f"to {b:.3g} -> {a:.3g} ms of the {t['before_ms']:.4g} -> {t['after_ms']:.4g} ms measured for the whole model, the rest "
               "being memory-bound ops (norms, activations, pooling, additions) and per-call overhead"]
        rose = [r.name for r in self.rows if r.name in layers and layers[r.name][1] > layers[r.name][0]]
        if rose:
            out.append(f"* {len(rose)} layer(s) ({', '.join(rose[:4])}{', ...' if len(rose) > 4 else ''}) timed slower alone at "
                       "their kept widths than at their full widths (the kernel for those widths is slower on this device); the "
                       "plan keeps them because the whole model, as measured, meets the target")
        return self.notes + out

    def summary(self) -> str:
        f0, f1 = self.flops
        p0, p1 = self.params
        text = (
            f"FLOPs {f0 / 1e9:.4g} G -> {f1 / 1e9:.4g} G ({100 * (1 - f1 / max(f0, 1)):.1f}% removed); "
            f"params {p0 / 1e6:.4g} M -> {p1 / 1e6:.4g} M; other ops {si(self.other_flops[0])} -> "
            f"{si(self.other_flops[1])} FLOPs"
        )
        if self.latency:
            text += "\n" + latency_summary(self.latency)
        return text

    def __str__(self) -> str:
        text = self._table("simple") + "\n" + self.summary()
        if self.all_notes():
            text += "\n" + "\n".join(f"note: {n}" for n in self.all_notes())
        return text

    def to_markdown(self) -> str:
        text = self._table("github") + "\n\n" + self.summary() + "\n"
        if self.all_notes():
            text += "\n" + "\n".join(f"- {n}" for n in self.all_notes()) + "\n"
        return text

    def then(self, later: Report) -> Report:
        """One report for two prunings in a row (e.g. every step of gradual pruning): this report's
        "before", ``later``'s "after"; layers are matched by name."""
        first = {r.name: r for r in self.rows}
        rows = [first[r.name].then(r) if r.name in first else r for r in later.rows]
        return Report(rows, *_spans(self, later, ("params", "macs", "other_flops")), list(dict.fromkeys(self.notes + later.notes)), later.latency)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain data (what ``dataclasses.asdict`` gives, without its per-value deep copies:
        rows hold tuples of numbers only)."""
        return {"rows": [dict(vars(r)) for r in self.rows], "params": self.params, "macs": self.macs,
                "other_flops": self.other_flops, "notes": list(self.notes), "latency": copy.deepcopy(self.latency)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        rows = [LayerRow(**{k: tuple(v) if isinstance(v, list) else v for k, v in r.items()}) for r in d["rows"]]
        return cls(rows, tuple(d["params"]), tuple(d["macs"]), tuple(d["other_flops"]), list(d["notes"]), d.get("latency"))
