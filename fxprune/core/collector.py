"""collector: Python's cyclic garbage collector held off while a pass allocates, and run once at its end.

A compile allocates some hundred thousand objects (graph nodes, labels, module copies). With the collector
on, every 700 allocations start a young collection that walks each object the compile still holds, and the
ones alive at ten of them are promoted to the oldest generation; once promoted objects reach a quarter of
the process's, a full collection walks the whole heap: about 0.2 s in a process with torchvision loaded,
inside whichever compile crosses that line. Timing twelve models' compiles in turn (``compile_time.py``'s
list, each result discarded), full collections ran during 5 of the 12 models' timings; with ``paused``,
during 1 (MaxViT-T's, outside its compiles). ``paused``
turns the collector off for a block and runs one young collection at its end: the block's garbage is freed
inside the block that made it, and only what the block keeps is promoted. The collections cost the same
time (one long walk instead of many short ones); what goes is the promotion of the block's temporaries.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["paused"]


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """The collector off for the block, then one collection of the youngest generation; a no-op inside
    another ``paused`` block or when the collector is off already (the user's choice is kept)."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect(0)
