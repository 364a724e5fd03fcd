"""The timing cache: stable timings on disk, one JSON file per user, keyed by where they were taken.

Layer timings are shared between models whose layers have the same shapes, and comparisons of a pruned
candidate with its original are kept under the captured architecture; ``caching(False)`` (``cache=False``)
neither reads nor writes the file.
"""

from __future__ import annotations

import contextlib
import copy
import contextvars
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from .timing import STABLE, Latency, Setting

__all__ = ["TimingCache", "caching", "cache_path"]


_CACHING = contextvars.ContextVar("fxprune_caching", default=True)


@contextlib.contextmanager
def caching(enabled: bool) -> Iterator[None]:
    """Within this block, ``TimingCache`` reads and writes its file only when ``enabled`` (``cache=False``)."""
    token = _CACHING.set(enabled)
    try:
        yield
    finally:
        _CACHING.reset(token)


def cache_path() -> Path:
    """The timing cache's file: ``$FXPRUNE_CACHE_DIR/latency.json`` (default ``~/.cache/fxprune``)."""
    return Path(os.environ.get("FXPRUNE_CACHE_DIR", Path.home() / ".cache" / "fxprune")) / "latency.json"


class TimingCache:
    """Timings on disk, one JSON file (``cache_path``): ``{setting key: {what was timed: its timing}}``; a
    timing is any JSON value (a ``Latency.to_row``, a ``Comparison.to_row``). Only timings that their
    caller calls stable are kept, so a burst of other work on the machine is measured again next time
    rather than replayed.

    Inside ``caching(False)`` the file is neither read nor written. ``measured`` counts the timings this
    process took rather than read, so callers and tests can see the cache at work.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else cache_path()
        self.enabled = _CACHING.get()
        self.held: dict[str, dict[str, Any]] | None = None  # what the file may hold once timings are held
        self.measured = 0
        self.taken: list[tuple[str, str]] = []  # (setting key, key) of each timing kept from this instance
        self.unsaved = False
        self.data: dict[str, dict[str, Any]] = {}
        if self.enabled:
            with contextlib.suppress(OSError, ValueError):
                self.data = json.loads(self.path.read_text())

    def lookup(self, setting: Setting, key: str) -> Any:
        """The value kept under ``key`` (None when there is none)."""
        return self.data.get(setting.key(), {}).get(key)

    def put(self, setting: Setting, key: str, value: Any) -> None:
        """Keep the claim ``value`` under ``key`` (a result, timed again before it is used), and write the file:
        even when the timings are held, not when caching is off."""
        if self.enabled:
            for data in self._tables():
                data.setdefault(setting.key(), {})[key] = value
            self.unsaved = True
            self.save()

    def get(self, setting: Setting, key: str, measure: Callable[[], Any], keep: Callable[[Any], bool] = lambda value: True) -> Any:
        """The cached timing of ``key`` under ``setting``, measured on a miss and kept when ``keep`` says so."""
        table = self.data.setdefault(setting.key(), {})
        if key in table:
            return table[key]
        value = measure()
        self.measured += 1
        if keep(value):
            table[key] = value
            self.taken.append((setting.key(), key))
            self.unsaved = True
        return value

    def steady_ms(self, setting: Setting, key: str, measure: Callable[[], Latency], tolerance: float = 2 * STABLE, tries: int = 3) -> float:
        """The median milliseconds of ``measure()``, measured again (at most ``tries`` times) while its
        interval is wider than ``tolerance``; the steadiest timing is used, and kept only when steady."""
        def steadiest() -> list[Any]:
            best = measure()
            for _ in range(tries - 1):
                if best.uncertainty <= tolerance:
                    break
                best = min(best, measure(), key=lambda lat: lat.uncertainty)
            return best.to_row()

        return self.get(setting, key, steadiest, lambda row: Latency.from_row(row, setting).uncertainty <= tolerance)[0]

    def _tables(self) -> list[dict[str, dict[str, Any]]]:
        """The timings in memory, and what the file may hold once they are held."""
        return [self.data] if self.held is None else [self.data, self.held]

    @property
    def not_kept(self) -> str | None:
        """Why the timings taken now will not be on disk next time (None: they will, when stable)."""
        if not self.enabled:
            return "caching is off"
        return "taken on a machine found noisy" if self.held is not None else None

    def hold(self) -> None:
        """Keep no more timings on disk from this instance: they were taken on a machine found too noisy
        (bursts of other work inflate a short timing without widening its interval). Claims still are."""
        if self.held is None:
            self.held = copy.deepcopy(self.data)

    def withdraw(self) -> None:
        """Take the timings kept from this instance off the disk again: the compile that took them found the machine
        too noisy to decide its target after they were taken, so they may sit in the onset of that load (a quiet
        compile after it built its latency model from layer timings taken under load, and returned 3.4x for 1.5x)."""
        for setting_key, key in self.taken:
            for data in self._tables():
                data.get(setting_key, {}).pop(key, None)
        self.unsaved = self.unsaved or bool(self.taken)
        self.taken = []
        self.save()

    def forget(self, setting: Setting, keys: Iterable[str]) -> None:
        """Take the timings of ``keys`` off the cache, whichever compile took them (found taken under load, say); not saved."""
        keys = list(keys)
        for data in self._tables():
            for key in keys:
                data.get(setting.key(), {}).pop(key, None)
        self.unsaved = self.unsaved or bool(keys)

    def drop(self, setting: Setting, prefix: str) -> int:
        """Forget the timings whose key starts with ``prefix``; how many there were."""
        gone = [k for k in self.data.get(setting.key(), {}) if k.startswith(prefix)]
        self.forget(setting, gone)
        return len(gone)

    def save(self) -> None:
        """Write the file atomically when it lacks timings kept here; a cache that cannot be written only
        costs time later."""
        if not (self.enabled and self.unsaved):
            return
        self.unsaved = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.data if self.held is None else self.held, indent=0, sort_keys=True))
            tmp.replace(self.path)
        except OSError:
            pass
