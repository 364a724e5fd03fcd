"""Measured latency: how long a module takes on the device that holds it, and a disk cache of layer timings.

A latency is always measured the way the pruned model will run: eval mode, ``torch.no_grad()``, the
current torch thread count, the batch size of the given inputs, on the device of the model's parameters
(CUDA work is synchronized before a clock is read). Comparisons time the models in turns, so that a
machine that slows down slows every model alike, and report medians.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .fxutil import eval_mode

__all__ = ["Latency", "measure_latency", "measure_in_turns", "layer_ms", "Setting", "TimingCache"]

METHOD = 2
"""How layers are timed (``layer_ms``); part of every cache key, so timings taken another way are taken again."""

_MMAP_MAX = 32 << 20
"""glibc malloc's largest dynamic mmap threshold on 64-bit systems (``DEFAULT_MMAP_THRESHOLD_MAX``)."""


@dataclass(frozen=True)
class Setting:
    """Where a latency was measured: the device, its name, the torch version, thread count and dtype."""

    device: str
    device_name: str
    torch: str
    threads: int
    dtype: str

    @classmethod
    def of(cls, module: nn.Module, inputs: Sequence[Any]) -> "Setting":
        tensors = [t for t in (*module.parameters(), *module.buffers(), *inputs) if isinstance(t, torch.Tensor)]
        device = tensors[0].device if tensors else torch.device("cpu")
        floats = [t.dtype for t in tensors if t.is_floating_point()]
        return cls(str(device), _device_name(device), torch.__version__, torch.get_num_threads(), str(floats[0] if floats else torch.float32))

    def key(self) -> str:
        return f"{self.device_name}|torch {self.torch}|{self.threads} threads|{self.dtype}|method {METHOD}"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"cpu {name} ({torch.backends.cpu.get_cpu_capability()})"


@dataclass(frozen=True)
class Latency:
    """Median and quartiles of per-call milliseconds over ``runs`` timed calls, and where they were taken."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    runs: int
    batch: int | None
    setting: Setting

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median."""
        return (self.q3_ms - self.q1_ms) / self.median_ms if self.median_ms else 0.0

    def __str__(self) -> str:
        s = self.setting
        return (f"{self.median_ms:.3f} ms median (IQR {self.q1_ms:.3f}-{self.q3_ms:.3f}, {self.runs} runs; batch {self.batch}, "
                f"{s.device}, {s.threads} threads, {s.dtype})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_row(self) -> list[Any]:
        """The numbers without the setting, for the timing cache."""
        return [self.median_ms, self.q1_ms, self.q3_ms, self.runs, self.batch]

    @classmethod
    def from_row(cls, row: Sequence[Any], setting: Setting) -> "Latency":
        return cls(*row, setting)


def _sync(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def _batch(inputs: Sequence[Any]) -> int | None:
    first = next((t for t in inputs if isinstance(t, torch.Tensor) and t.dim() > 0), None)
    return int(first.shape[0]) if first is not None else None


def _summary(ms: list[float], inputs: Sequence[Any], setting: Setting) -> Latency:
    q = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0]] * 3
    return Latency(statistics.median(ms), q[0], q[2], len(ms), _batch(inputs), setting)


def measure_in_turns(models: Sequence[nn.Module], inputs: Sequence[Any], *, repeat: int = 15, warmup: int = 3, min_ms: float = 5.0) -> list[Latency]:
    """Latency of each of ``models`` on the same ``inputs``, timed in turns (one timing of each model per
    round, ``repeat`` rounds after ``warmup``). A timing runs enough calls to last about ``min_ms``."""
    inputs = tuple(inputs)
    setting = Setting.of(models[0], inputs)
    sync = _sync(setting.device)
    samples: list[list[float]] = [[] for _ in models]
    with torch.no_grad(), eval_mode(*models):
        calls = []
        for m in models:
            for _ in range(warmup):
                m(*inputs)
            sync()
            t = time.perf_counter()
            m(*inputs)
            sync()
            calls.append(max(1, int(min_ms / max((time.perf_counter() - t) * 1e3, 1e-3))))
        for _ in range(repeat):
            for i, m in enumerate(models):
                sync()
                t = time.perf_counter()
                for _ in range(calls[i]):
                    m(*inputs)
                sync()
                samples[i].append((time.perf_counter() - t) * 1e3 / calls[i])
    return [_summary(s, inputs, setting) for s in samples]


def layer_ms(layer: nn.Module, x: torch.Tensor) -> float:
    """Median milliseconds of ``layer(x)`` alone, as the layer runs inside a model.

    A loop that allocates the same large output again and again is the worst case of glibc's malloc:
    a block at least as large as the largest it has unmapped gets fresh pages from the kernel each time,
    and faulting them in took 10x a 16->64 conv's time at 160x160 (10 ms against 1 ms) on a virtual
    machine, while inside the model, where larger blocks were freed before, it took 1.8 ms. So one
    block twice the size of the layer's largest tensor is freed first, as a model's run does."""
    with torch.no_grad(), eval_mode(layer):
        out = layer(x)
    if x.device.type == "cpu":
        torch.empty(min(2 * max(x.nbytes, out.nbytes), _MMAP_MAX - (1 << 20)), dtype=torch.uint8)
    return measure_in_turns([layer], (x,), repeat=5, warmup=2, min_ms=2.0)[0].median_ms


def measure_latency(model: nn.Module, example_inputs: Any, *, repeat: int = 15, warmup: int = 3) -> Latency:
    """Latency of ``model`` on ``example_inputs`` (a tensor or a tuple of positional inputs): eval mode,
    no_grad, the current thread count, on the device that holds the model. ``model`` is left as it was."""
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    return measure_in_turns([model], inputs, repeat=repeat, warmup=warmup)[0]


class TimingCache:
    """Timings on disk, one JSON file: ``{setting key: {what was timed: its timing}}``; a timing is any
    JSON value (a layer's milliseconds, a model's ``Latency.to_row``).

    The file lives in ``$FXPRUNE_CACHE_DIR`` (default ``~/.cache/fxprune``); ``measured`` counts the
    timings this process took rather than read, so callers and tests can see the cache at work.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        root = Path(os.environ.get("FXPRUNE_CACHE_DIR", Path.home() / ".cache" / "fxprune"))
        self.path = Path(path) if path is not None else root / "latency.json"
        self.measured = 0
        self.saved = 0  # how many of the measured timings the file holds
        try:
            self.data: dict[str, dict[str, Any]] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.data = {}

    def get(self, setting: Setting, key: str, measure: Callable[[], Any]) -> Any:
        """The cached timing of ``key`` under ``setting``, measured (and kept) on a miss."""
        table = self.data.setdefault(setting.key(), {})
        if key not in table:
            table[key] = measure()
            self.measured += 1
        return table[key]

    def save(self) -> None:
        """Write the file atomically when it lacks timings taken here; a cache that cannot be written only
        costs time later."""
        if self.saved == self.measured:
            return
        self.saved = self.measured
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.data, indent=0, sort_keys=True))
            tmp.replace(self.path)
        except OSError:
            pass
