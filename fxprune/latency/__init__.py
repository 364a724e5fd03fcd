"""Measured latency: timings that carry their spread and a disk cache of them (``timing``), the latency
cost model and ``round_to="auto"`` (``costmodel``), and a latency target reached as measured (``reach``)."""
