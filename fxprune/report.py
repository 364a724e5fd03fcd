"""Report: the per-layer FLOP/parameter table of one pruning, before -> after."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from tabulate import tabulate

__all__ = ["Report", "LayerRow"]


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

    def then(self, later: "LayerRow") -> "LayerRow":
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
    latency: dict[str, Any] | None = None  # what a latency target measured (pipeline.reach_latency)

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
        if self.latency and "layers_ms" in self.latency:  # estimated per layer from its timings; the total is measured
            layers = self.latency["layers_ms"]
            for row, r in zip(body, self.rows):
                row.append(_arrow(tuple(layers[r.name]), _ms) if r.name in layers else "-")
            body[-1].append(_arrow((self.latency["before_ms"], self.latency["after_ms"]), _ms))
            headers.append("ms (layers est.)")
        return tabulate(body, headers=headers, tablefmt=fmt)

    def summary(self) -> str:
        f0, f1 = self.flops
        p0, p1 = self.params
        text = (
            f"FLOPs {f0 / 1e9:.4g} G -> {f1 / 1e9:.4g} G ({100 * (1 - f1 / max(f0, 1)):.1f}% removed); "
            f"params {p0 / 1e6:.4g} M -> {p1 / 1e6:.4g} M; other ops {si(self.other_flops[0])} -> "
            f"{si(self.other_flops[1])} FLOPs"
        )
        if self.latency:
            t = self.latency
            when = "" if t.get("results_timed", 1) else ", timed by an earlier compile of this architecture"
            text += (f"\nlatency {t['before_ms']:.4g} ms -> {t['after_ms']:.4g} ms ({t['speedup']:.3g}x faster, measured in "
                     f"turns; batch {t['batch']}, {t['device']}, {t['threads']} threads, {t['dtype']}{when})")
        return text

    def __str__(self) -> str:
        text = self._table("simple") + "\n" + self.summary()
        if self.notes:
            text += "\n" + "\n".join(f"note: {n}" for n in self.notes)
        return text

    def to_markdown(self) -> str:
        text = self._table("github") + "\n\n" + self.summary() + "\n"
        if self.notes:
            text += "\n" + "\n".join(f"- {n}" for n in self.notes) + "\n"
        return text

    def then(self, later: "Report") -> "Report":
        """One report for two prunings in a row (e.g. every step of gradual pruning): this report's
        "before", ``later``'s "after"; layers are matched by name."""
        first = {r.name: r for r in self.rows}
        rows = [first[r.name].then(r) if r.name in first else r for r in later.rows]
        return Report(rows, *_spans(self, later, ("params", "macs", "other_flops")), list(dict.fromkeys(self.notes + later.notes)), later.latency)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Report":
        rows = [LayerRow(**{k: tuple(v) if isinstance(v, list) else v for k, v in r.items()}) for r in d["rows"]]
        return cls(rows, tuple(d["params"]), tuple(d["macs"]), tuple(d["other_flops"]), list(d["notes"]), d.get("latency"))
