"""Measured latency: intervals of a median and the rule that decides a timing (``intervals``), timings that carry
their spread (``timing``) and a disk cache of them (``cache``), the machine check before a latency target
(``machine``), the latency cost model (``costmodel``) and the multiple ``round_to="auto"`` stands for (``multiple``).
Latency targets are reached in ``targets``."""
