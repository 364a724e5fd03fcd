"""The width rule: how many channel atoms a pruned group may keep (see selection/budget.py for how the budget
logic applies it)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ArgumentError

__all__ = ["WidthRule"]


@dataclass(frozen=True)
class WidthRule:
    """How many atoms a pruned group may keep: at least ``min_width`` and a multiple of ``step`` (see the
    module docstring). A group may always keep all its atoms. ``equal_widths``: groups that repeat from
    layer to layer (the same members but for the layer index) keep equal widths, as a Hugging Face
    config, with one size per model, needs."""

    min_width: int = 1
    round_to: int = 1
    equal_widths: bool = False

    def __post_init__(self) -> None:
        for name in ("min_width", "round_to"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ArgumentError(f"{name} must be an integer >= 1, got {value!r}")

    def step(self, width: int, channels_per_atom: int = 1, repeated: bool = False) -> int:
        """The multiple of atoms a pruned group of ``width`` atoms keeps: ``round_to`` channels, halved
        while the group is not wider than that (a 16-channel group keeps 8 or 16 at ``round_to=16``);
        for ``repeated`` atoms (positions in every group of a grouped conv) ``round_to`` atoms, or all."""
        if repeated:
            return self.round_to if width > self.round_to else width
        r = self.round_to
        while r > 1 and width * channels_per_atom <= r:
            r //= 2
        return r // math.gcd(r, channels_per_atom)

    def kept(self, width: int, removed: int, channels_per_atom: int = 1, repeated: bool = False) -> int:
        """The allowed kept count nearest to ``width - removed`` (a tie keeps more)."""
        want = max(width - removed, self.min_width)
        step = self.step(width, channels_per_atom, repeated)
        up = min(width, -(-want // step) * step)
        down = want // step * step
        return down if down >= self.min_width and want - down < up - want else up

    def more(self, width: int, kept: int, channels_per_atom: int = 1, repeated: bool = False) -> int:
        """The next allowed kept count above ``kept`` (``width`` at most)."""
        step = self.step(width, channels_per_atom, repeated)
        return min(width, (kept // step + 1) * step)

    def __str__(self) -> str:
        return f"min_width={self.min_width}, round_to={self.round_to}" + (", equal_widths=True" if self.equal_widths else "")
