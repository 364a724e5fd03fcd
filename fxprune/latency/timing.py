"""Measured latency: how long a module takes on the device that holds it, how sure that is, and a disk
cache of timings.

A latency is always measured the way the pruned model will run: eval mode, ``torch.no_grad()``, the
current torch thread count, the batch size of the given inputs, on the device of the model's parameters
(CUDA work is synchronized before a clock is read). A timing is a sample, not a fact: every one keeps its
spread. Comparisons time the models in turns, so that a machine that slows down slows every model alike,
and give the ratio with a distribution-free interval of its median and the noise of the original timed
against itself (``compare``); code that acts on a timing decides on the interval, and stops timing as
soon as the interval decides. Every clock reading goes through ``time_calls``, the one place a test
replaces to fake the clock. The thread count is a setting of its own (``threads``), shown with every
latency.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..core.fxutil import MMAP_MAX, eval_mode
from .intervals import CONFIDENCE, aa_noise, burst_limit, futile, median_interval, round_ratios, verdict

__all__ = ["Latency", "Comparison", "measure_latency", "measure_in_turns", "compare", "time_calls", "layer_ms",
           "Setting", "threads", "steady_malloc", "malloc_fixed", "warm_calls", "summarize", "synchronizer", "STABLE", "BURST", "FEWEST", "PATIENCE",
           "WARMUP", "MIN_MS"]

METHOD = 5
"""How timings are taken and kept; part of every cache key, so timings taken another way are taken again."""

STABLE = 0.05
"""A timing is stable when the relative half-width of its median's interval is at most this; only stable
timings are cached."""

BURST = 0.10
"""A round whose two timings of the original differ by more than this is discarded: a burst of other
work hit it (such bursts last seconds, longer than a round), and its ratio says nothing about the models.
A machine whose quiet A/A pairs already differ more than that gets a wider bound (``Machine.burst``)."""

PATIENCE = 4
"""A timing with a goal stops undecided once this many times the rounds it has left would still leave the
goal inside its interval (``futile``). The prediction is centred on the median so far, itself uncertain,
so it asks for a margin. Simulated (benchmarks/futile_rounds.py: 4% and 8% noise, 2x asked, 20 rounds at
most): a candidate as fast as the goal took 7 rounds instead of 20, one 5% off it 8-12 instead of 19-20, and
timings were decided up to 6 points less often than without the rule (2.3x at 8% noise: 77% -> 71%); with the
factor at 1, up to 29 points less often."""

FEWEST = 6
"""Rounds a comparison takes before it may decide: the fewest whose 95% interval of the median is not
the whole range of a smaller sample."""

WARMUP = 2
"""Calls of each model before a comparison or the machine check times it (``warm_calls``)."""

MIN_MS = 5.0
"""A timing of a whole model runs enough calls to last about this many milliseconds (``warm_calls``)."""

@dataclass(frozen=True)
class Setting:
    """Where a latency was measured: the device, its name, the torch version, thread count and dtype."""

    device: str
    device_name: str
    torch: str
    threads: int
    dtype: str

    @classmethod
    def of(cls, module: nn.Module, inputs: Sequence[Any]) -> Setting:
        tensors = [t for t in (*module.parameters(), *module.buffers(), *inputs) if isinstance(t, torch.Tensor)]
        device = tensors[0].device if tensors else torch.device("cpu")
        floats = [t.dtype for t in tensors if t.is_floating_point()]
        return cls(str(device), _device_name(device), torch.__version__, torch.get_num_threads(), str(floats[0] if floats else torch.float32))

    def key(self) -> str:
        return f"{self.device_name}|torch {self.torch}|{self.threads} threads|{self.dtype}|method {METHOD}"


@contextlib.contextmanager
def threads(count: int | None) -> Iterator[int]:
    """Within this block torch runs on ``count`` intra-op threads (None: as it is); the count is restored after."""
    before = torch.get_num_threads()
    if count is not None:
        if count < 1:
            raise ValueError(f"threads must be at least 1, got {count}")
        torch.set_num_threads(count)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


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

    low_ms: float | None = None
    high_ms: float | None = None

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median."""
        return (self.q3_ms - self.q1_ms) / self.median_ms if self.median_ms else 0.0

    @property
    def uncertainty(self) -> float:
        """Half-width of the median's ``CONFIDENCE`` interval relative to the median (IQR-based without one)."""
        if self.low_ms is None or self.high_ms is None:
            return self.spread / 2
        return (self.high_ms - self.low_ms) / 2 / self.median_ms if self.median_ms else 0.0

    def __str__(self) -> str:
        s = self.setting
        interval = "" if self.low_ms is None else f"{CONFIDENCE:.0%} interval {self.low_ms:.3f}-{self.high_ms:.3f}, "
        return (f"{self.median_ms:.3f} ms median ({interval}IQR {self.q1_ms:.3f}-{self.q3_ms:.3f}, {self.runs} runs; batch {self.batch}, "
                f"{s.device}, {s.threads} threads, {s.dtype})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_row(self) -> list[Any]:
        """The numbers without the setting, for the timing cache."""
        return [self.median_ms, self.q1_ms, self.q3_ms, self.runs, self.batch, self.low_ms, self.high_ms]

    @classmethod
    def from_row(cls, row: Sequence[Any], setting: Setting) -> Latency:
        median, q1, q3, runs, batch, *interval = row
        return cls(median, q1, q3, runs, batch, setting, *interval)


_THRESHOLDS = ("mmap", "trim")
_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
"""glibc's ``mallopt`` parameters: the free memory at the heap's top past which a ``free`` returns it to the kernel,
and the size from which a block is mapped afresh from the kernel (and unmapped when freed)."""

_held = 0  # timings now inside ``steady_malloc``: the outermost one sets the thresholds back


def malloc_fixed(environ: Mapping[str, str] = os.environ) -> frozenset[str]:
    """Which of glibc malloc's thresholds (``"mmap"``, ``"trim"``) the environment sets (``MALLOC_MMAP_THRESHOLD_``,
    ``MALLOC_TRIM_THRESHOLD_`` or ``GLIBC_TUNABLES``); both when it preloads another allocator."""
    if any(a in environ.get("LD_PRELOAD", "") for a in _ALLOCATORS):
        return frozenset(_THRESHOLDS)
    tunables = environ.get("GLIBC_TUNABLES", "")
    return frozenset(t for t in _THRESHOLDS if f"MALLOC_{t.upper()}_THRESHOLD_" in environ or f"{t}_threshold" in tunables)


@functools.cache
def _glibc() -> Any:
    """The C library, where it is glibc's (its ``mallopt``); else None."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


@contextlib.contextmanager
def steady_malloc(device: str, environ: Mapping[str, str] = os.environ) -> Iterator[None]:
    """glibc's malloc, for the length of a timing, in the one state the process's history cannot move: every block
    from the heap and none returned to the kernel (both thresholds past any tensor), so a model's calls reuse
    their memory and page-fault none of it, as with a caching allocator (jemalloc, tcmalloc) or both thresholds
    set. On glibc's own settings a tensor over the mmap threshold is mapped afresh and page-faulted on every
    call, and whether a ``free`` returns the heap's top to the kernel depends on what the process allocated
    before: one MobileNetV2 plan at batch 8 timed 1.73x and 2.31x in two processes, and with the trim threshold
    alone held off, another timed 2.38x in one compile and 1.45x in the next (docs/latency.md). After the
    block the thresholds are where glibc's own adaptation ends (32 MiB, and trim at twice that), and the free
    memory goes back to the kernel (``malloc_trim``): kept, it piled up over a latency compile's timings
    (MobileNetV2 at batch 8: 1,364 MiB resident after it, against 845 MiB before this rule). Nothing changes
    off glibc or the CPU, or where the environment sets malloc's thresholds or another allocator."""
    global _held
    libc = _glibc() if device.startswith("cpu") and not malloc_fixed(environ) else None
    if libc is None:
        yield
        return
    if not _held:
        libc.mallopt(M_MMAP_THRESHOLD, (1 << 31) - 1)
        libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1)
    _held += 1
    try:
        yield
    finally:
        _held -= 1
        if not _held:
            libc.mallopt(M_MMAP_THRESHOLD, MMAP_MAX)
            libc.mallopt(M_TRIM_THRESHOLD, 2 * MMAP_MAX)
            libc.malloc_trim(0)  # what the timing freed goes back to the kernel, not into the next timing's heap


def synchronizer(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def _batch(inputs: Sequence[Any]) -> int | None:
    first = next((t for t in inputs if isinstance(t, torch.Tensor) and t.dim() > 0), None)
    return int(first.shape[0]) if first is not None else None


def summarize(ms: list[float], inputs: Sequence[Any], setting: Setting) -> Latency:
    q = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0]] * 3
    return Latency(statistics.median(ms), q[0], q[2], len(ms), _batch(inputs), setting, *median_interval(ms))


def time_calls(model: Callable[..., Any], inputs: Sequence[Any], calls: int, sync: Callable[[], None]) -> float:
    """Milliseconds per call of ``calls`` calls of ``model(*inputs)``: the one clock every timing here reads."""
    sync()
    t = time.perf_counter()
    for _ in range(calls):
        model(*inputs)
    sync()
    return (time.perf_counter() - t) * 1e3 / calls


def warm_calls(models: Sequence[nn.Module], inputs: Sequence[Any], warmup: int, min_ms: float, sync: Callable[[], None]) -> list[int]:
    """After ``warmup`` calls of each model, how many calls make one timing of it last about ``min_ms``."""
    out = []
    for m in models:
        for _ in range(warmup):
            m(*inputs)
        out.append(max(1, int(min_ms / max(time_calls(m, inputs, 1, sync), 1e-3))))
    return out


def measure_in_turns(models: Sequence[nn.Module], inputs: Sequence[Any], *, repeat: int = 15, warmup: int = 3, min_ms: float = MIN_MS) -> list[Latency]:
    """Latency of each of ``models`` on the same ``inputs``, timed in turns (one timing of each model per
    round, ``repeat`` rounds after ``warmup``). A timing runs enough calls to last about ``min_ms``."""
    inputs = tuple(inputs)
    setting = Setting.of(models[0], inputs)
    sync = synchronizer(setting.device)
    samples: list[list[float]] = [[] for _ in models]
    with torch.no_grad(), eval_mode(*models), steady_malloc(setting.device):
        calls = warm_calls(models, inputs, warmup, min_ms, sync)
        for _ in range(repeat):
            for i, m in enumerate(models):
                samples[i].append(time_calls(m, inputs, calls[i], sync))
    return [summarize(s, inputs, setting) for s in samples]


@dataclass(frozen=True)
class Comparison:
    """A candidate timed against the original in turns: each round times the original, the candidate and
    the original again. ``ratio`` is the median over rounds of the candidate's time over the mean of the
    two original timings around it (a machine that slows down within a round slows both sides), ``low``
    and ``high`` the ``CONFIDENCE`` interval of that median; ``noise`` is the relative half-width of the
    same interval for the original against itself (the second original timing over the first, an A/A
    pair): what this machine does to a ratio that is 1. ``dropped`` rounds were discarded as bursts
    (``BURST``) and count in none of these."""

    ratio: float
    low: float
    high: float
    noise: float
    rounds: int
    before: Latency
    after: Latency
    dropped: int = 0

    @property
    def speedup(self) -> float:
        return 1 / self.ratio

    @property
    def uncertainty(self) -> float:
        """Relative half-width of the ratio's interval."""
        return (self.high - self.low) / 2 / self.ratio

    @property
    def stable(self) -> bool:
        """Both the ratio and the A/A pair are known to within ``STABLE``, and bursts hit at most a quarter of the rounds."""
        return self.uncertainty <= STABLE and self.noise <= STABLE and self.dropped <= (self.rounds + self.dropped) / 4

    @property
    def floor(self) -> float:
        """The candidate's first quartile over the original's: other work only ever adds time, so the
        quickest quarter of each model's timings is the least disturbed, whichever model a burst hit."""
        return self.after.q1_ms / self.before.q1_ms

    def meets(self, goal: float) -> bool | None:
        """Whether the ratio is at most ``goal``: True or False when the whole interval, widened by the
        A/A noise, says so and the quickest timings (``floor``) agree; None when the interval holds
        ``goal`` or the two disagree (the noise is as large as the distance to the goal)."""
        decided = verdict(self.low, self.high, self.noise, goal)
        return decided if decided is None or decided == (self.floor <= goal) else None

    def describe(self) -> str:
        bursts = {0: "", 1: ", 1 round dropped as a burst"}.get(self.dropped, f", {self.dropped} rounds dropped as bursts")
        return (f"{self.speedup:.3g}x ({CONFIDENCE:.0%} interval {1 / self.high:.3g}-{1 / self.low:.3g}x over {self.rounds} rounds{bursts}; "
                f"the original against itself varied by {self.noise:.1%}; {self.before.setting.threads} threads)")

    def to_row(self) -> list[Any]:
        return [self.ratio, self.low, self.high, self.noise, self.rounds, self.before.to_row(), self.after.to_row(), self.dropped]

    @classmethod
    def from_row(cls, row: Sequence[Any], setting: Setting) -> Comparison:
        *numbers, before, after, dropped = row
        return cls(*numbers, Latency.from_row(before, setting), Latency.from_row(after, setting), dropped)

    @classmethod
    def identical(cls, original: Latency) -> Comparison:
        """The comparison of a model with a copy of itself that nothing was removed from: no timing can
        make it faster."""
        return cls(1.0, 1.0, 1.0, 0.0, 0, original, original)


def compare(original: nn.Module, candidate: nn.Module, inputs: Sequence[Any], *, rounds: int = FEWEST, most: int = 40,
            goal: float | None = None, seconds: float = 20.0, precision: float = STABLE, burst: float = BURST,
            warmup: int = WARMUP, min_ms: float = MIN_MS) -> Comparison:
    """Time ``candidate`` against ``original`` in turns (see ``Comparison``), sequentially: once ``rounds``
    rounds are kept, stop as soon as the ratio's interval decides ``goal`` (without a goal: is within
    ``precision``), else go on up to ``most`` rounds, or ``seconds`` of timed calls once ``rounds`` are
    kept; with a goal, also as soon as ``PATIENCE`` times the rounds left could not narrow the interval
    enough to decide it (``futile``: a candidate as fast as the goal, within the noise, times undecided to
    the end). A round whose A/A pair differs by more than ``burst``, and by more than three times the rounds'
    median A/A difference, is dropped: a burst stands out from the machine's usual noise (a machine whose
    every pair differs by 15% for a while would otherwise keep only the few rounds that agree by chance).
    ``candidate`` may be ``original``: an A/A pair."""
    inputs = tuple(inputs)
    setting = Setting.of(original, inputs)
    sync = synchronizer(setting.device)
    taken: list[tuple[float, float, float]] = []  # (original, candidate, original) per round
    with torch.no_grad(), eval_mode(original, candidate), steady_malloc(setting.device):
        n_orig, n_cand = warm_calls([original, candidate], inputs, warmup, min_ms, sync)
        while True:
            taken.append((time_calls(original, inputs, n_orig, sync), time_calls(candidate, inputs, n_cand, sync),
                          time_calls(original, inputs, n_orig, sync)))
            limit = burst_limit([b / a for a, _, b in taken], burst)
            kept = [r for r in taken if abs(r[2] / r[0] - 1) <= limit]
            spent = sum((a + b) * n_orig + c * n_cand for a, c, b in taken) / 1e3
            done = len(taken) >= most or (len(kept) >= rounds and spent > seconds)
            if len(kept) >= rounds or done:
                first, cand, second = zip(*(kept if len(kept) >= 2 else taken))
                ratios, aa = round_ratios(first, cand, second)
                result = Comparison(statistics.median(ratios), *median_interval(ratios), aa_noise(aa), len(ratios),
                                    summarize([*first, *second], inputs, setting), summarize(list(cand), inputs, setting), len(taken) - len(kept))
                decided = len(kept) >= rounds and (result.meets(goal) is not None if goal is not None else result.uncertainty <= precision)
                left = min(most - len(taken), int(max(seconds - spent, 0) / max(spent / len(taken), 1e-9)))
                if decided or done or (goal is not None and len(kept) >= rounds and futile(ratios, aa, len(kept) + PATIENCE * left, goal)):
                    return result


def layer_ms(layer: nn.Module, x: torch.Tensor) -> Latency:
    """Latency of ``layer(x)`` alone, as the layer runs inside a model (9 timings of about 1 ms).

    A loop that allocates the same large output again and again is the worst case of glibc's malloc:
    a block at least as large as the largest it has unmapped gets fresh pages from the kernel each time,
    and faulting them in took 10x a 16->64 conv's time at 160x160 (10 ms against 1 ms) on a virtual
    machine, while inside the model, where larger blocks were freed before, it took 1.8 ms: the timing
    runs in ``steady_malloc``, as every timing here does."""
    return measure_in_turns([layer], (x,), repeat=9, warmup=2, min_ms=1.0)[0]


def measure_latency(model: nn.Module, example_inputs: Any, *, repeat: int = 15, warmup: int = 3) -> Latency:
    """Latency of ``model`` on ``example_inputs`` (a tensor or a tuple of positional inputs): eval mode,
    no_grad, the current thread count, on the device that holds the model. ``model`` is left as it was."""
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    return measure_in_turns([model], inputs, repeat=repeat, warmup=warmup)[0]
