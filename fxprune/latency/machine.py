"""machine: a few seconds of timing the original before a latency target, to know whether it can be decided.

Other PyTorch work on the same cores is the noise users have: its OpenMP threads and ours stall each
other in bursts of seconds, and then a multi-threaded forward runs slower than a single-threaded one.
``check`` times the original in rounds of three (twice at the chosen thread count, then at one thread)
for about ``SECONDS``; the first two are an A/A pair, whose disagreement is what the machine does to a
ratio that is 1, and the third shows stalls (it comes last: the first call after a change of thread
count is often slower). ``Machine.refusal`` says
why a target cannot be decided now, so that ``compile`` refuses in seconds instead of searching for
minutes on timings that say nothing. ``fresh_pages`` says when a deployment on glibc's defaults pays page
faults that the timings, which keep every tensor in the heap (``timing.steady_malloc``), leave out.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import TensorMetadata

from ..core import metakeys as keys
from ..core.fxutil import MMAP_MAX, eval_mode
from . import timing
from .intervals import aa_noise, burst_limit
from .timing import BURST, MIN_MS, WARMUP, Latency, Setting, malloc_fixed, steady_malloc, summarize, synchronizer, threads, warm_calls

__all__ = ["Machine", "check", "fresh_pages", "SECONDS", "NOISY", "STALLED", "BURSTY"]

log = logging.getLogger("fxprune")

SECONDS = 2.0
"""How long ``check`` times the original (at least ``LEAST`` rounds, at most ``MOST``)."""

LEAST, MOST = 9, 30
"""Rounds ``check`` takes at least (the fewest whose 95% interval of the median leaves out the extremes)
and at most."""

NOISY = 0.10
"""The A/A noise (relative half-width of its median's interval, over the rounds no burst hit, as a
comparison keeps them) above which no target is decided: every result's interval is widened by it, so
one 10% from its target could not be told from it."""

STALLED = 1.25
"""A forward at the chosen thread count this many times slower than a one-thread forward at the same
moment is stalling on cores that other work holds (quietly, more threads are never much slower)."""

BURSTY = 1 / 3
"""The share of rounds whose A/A pair disagrees by more than ``Machine.burst`` above which the machine is busy."""


@dataclass(frozen=True)
class Machine:
    """What ``check`` measured: the original's latency at the chosen thread count and at one thread, the
    A/A noise, the share of rounds a burst hit, the median of chosen-count over one-thread time, and the
    A/A disagreement that counts as a burst here (``BURST``, or three times the median disagreement on a
    machine whose every forward varies more: a 2-vCPU virtual machine's 2-thread forwards of MobileNetV2
    at batch 8 varied by 15% with nothing else running)."""

    original: Latency
    single: Latency | None
    noise: float
    bursts: float
    stall: float
    seconds: float
    burst: float = BURST
    faults: str | None = None  # what every timing pays that a deployment may not (``fresh_pages``)

    @property
    def threads(self) -> int:
        return self.original.setting.threads

    def refusal(self) -> str | None:
        """Why no latency target can be decided on this machine now, with what to do; None when it can."""
        n = self.threads
        seen = (f"timing the original for {self.seconds:.1f} s, its A/A pairs varied by {self.noise:.1%} and bursts of other work "
                f"hit {self.bursts:.0%} of the rounds")
        if self.single is not None:
            seen += (f"; a {n}-thread forward took {self.original.median_ms:.4g} ms against {self.single.median_ms:.4g} ms at 1 "
                     "thread at the same moments")
        reasons = [f"other work holds the cores, so {n} threads stall each other ({self.stall:.2f}x the 1-thread time)"
                   for _ in range(self.single is not None and self.stall > STALLED)]
        reasons += ["the machine is too noisy to tell a result from its target" for _ in range(self.noise > NOISY or self.bursts > BURSTY)]
        if not reasons:
            return None
        why = ", and ".join(reasons)
        fix = ("close the other work (other PyTorch jobs included) and compile again, or prune to FLOPs (target_gflops= or "
               "ratio=), which needs no timing")
        if n > 1:
            fix = (f"measure at the thread count you deploy with: at threads=1 (--threads 1; torch.set_num_threads(1) at "
                   f"deployment) no threads stall on each other, though other work still shares the cores; or {fix}")
        return f"{why} ({seen}). To decide a latency target, {fix}."


def _aa(first: Sequence[float], second: Sequence[float]) -> tuple[float, float, float]:
    """(A/A noise over the rounds no burst hit, share of rounds a burst hit, the disagreement that counts as one)."""
    aa = [b / a for a, b in zip(first, second)]
    burst = burst_limit(aa, BURST)
    steady = [r for r in aa if abs(r - 1) <= burst]  # as a comparison keeps them
    return aa_noise(steady if len(steady) >= 2 else aa), (len(aa) - len(steady)) / len(aa), burst  # 4 of 12 is 1/3, not over it


def check(model: nn.Module, inputs: Sequence[Any], seconds: float = SECONDS) -> Machine:
    """Time ``model`` in rounds (twice at the chosen thread count, once at one thread) for about ``seconds``,
    or ``LEAST`` rounds of a slower model (logged after the first round, with what they are expected to take);
    up to three times as long while the A/A noise is above ``NOISY``, since its interval narrows with the
    rounds (a model slow enough for few rounds in ``seconds`` looks noisier than it is)."""
    inputs = tuple(inputs)
    setting = Setting.of(model, inputs)
    sync = synchronizer(setting.device)
    n = torch.get_num_threads()
    first: list[float] = []
    single: list[float] = []
    second: list[float] = []
    with torch.no_grad(), eval_mode(model), steady_malloc(setting.device):
        (calls,) = warm_calls([model], inputs, WARMUP, MIN_MS, sync)
        def more() -> bool:
            spent = sum(first + second + single) * calls / 1e3
            return len(first) < LEAST or spent < seconds or (spent < 3 * seconds and _aa(first, second)[0] > NOISY)

        while len(first) < MOST and more():
            first.append(timing.time_calls(model, inputs, calls, sync))
            second.append(timing.time_calls(model, inputs, calls, sync))
            if n > 1 and setting.device == "cpu":
                with threads(1):
                    single.append(timing.time_calls(model, inputs, calls, sync))
            if len(first) == 1:
                log.info("checking the machine: timing the original at %d thread%s%s for about %.0f s", n, "s" * (n > 1),
                         " and at 1 thread" if single else "", max(seconds, LEAST * sum(first + second + single) * calls / 1e3))
    noise, bursts, burst = _aa(first, second)
    mean = [(a + b) / 2 for a, b in zip(first, second)]
    return Machine(summarize(first + second, inputs, setting), summarize(single, inputs, replace(setting, threads=1)) if single else None,
                   noise, bursts, statistics.median(m / s for m, s in zip(mean, single)) if single else 1.0,
                   sum(first + second + single) * calls / 1e3, burst)


def fresh_pages(gm: torch.fx.GraphModule, device: str, environ: Mapping[str, str] = os.environ, libc: str | None = None) -> str | None:
    """What a deployment of ``gm`` on glibc's defaults may pay that its timings (``timing.steady_malloc``) do not, or None.

    glibc's malloc maps a block above its largest mmap threshold (32 MiB) from the kernel at each
    allocation and unmaps it when freed, so a forward page-faults each tensor that large, every call: a
    1x1 16->96 conv over 8x16x112x112 (a 38 MB output) took 28 ms here, 4.6 ms with glibc's thresholds
    raised, and MobileNetV2 at batch 8 99 ms against 66 ms. A plan that brings such a tensor below 32 MiB
    then gains more than its FLOPs say (that model's 60%- and 62%-removed plans timed 1.6x and 2.1-2.7x,
    1.3x and 1.4x with the thresholds raised). None off glibc or the CPU, when no tensor is that large,
    or when the environment sets both of glibc's thresholds or preloads another allocator; where it sets
    one alone, the timings keep it (``steady_malloc``) and the note says that glibc then faults more.
    """
    libc, fixed = platform.libc_ver()[0] if libc is None else libc, malloc_fixed(environ)
    if not device.startswith("cpu") or libc != "glibc" or len(fixed) == 2:
        return None
    sizes = {n.name: m.dtype.itemsize * m.shape.numel() for n in gm.graph.nodes
             if isinstance(m := n.meta.get(keys.TENSOR_META), TensorMetadata) and all(isinstance(d, int) for d in m.shape)}
    big = [name for name, size in sizes.items() if size > MMAP_MAX]
    if not big:
        return None
    largest = max(big, key=sizes.__getitem__)
    both = ("MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ set (e.g. both 1073741824), or with jemalloc or tcmalloc in "
            "LD_PRELOAD")
    head = (f"{len(big)} tensors of a forward are over glibc malloc's {MMAP_MAX >> 20} MiB mmap ceiling (the largest, {largest}, "
            f"{sizes[largest] / 2**20:.0f} MiB)")
    if fixed:
        (one,) = fixed
        return (f"{head}, and the environment sets glibc's {one} threshold alone, so glibc no longer adapts the other one and may "
                f"page-fault such tensors on every call, in these timings too. Start the compile and the deployment with {both}")
    return (f"{head}. The timings here keep every tensor in the heap, as a caching allocator does; a process on glibc's "
            "defaults maps such a tensor afresh and page-faults it on every call, and returns freed memory to the kernel as its "
            "history decides, which can make the original and this result slower than timed, the original more. To run as "
            f"timed, start the deployment with {both}")
