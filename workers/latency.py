"""Moving averages of a worker's latencies, sent in its heartbeats (least_response_time).

No I/O: the worker runtime and the fleet simulator both keep one per worker.
"""

from __future__ import annotations


class LatencyAverages:
    """TTFT and TPOT moving averages of this worker's requests (for heartbeats)."""

    ALPHA = 0.2  # weight of the newest request

    def __init__(self) -> None:
        self.ttft_ms = 0.0
        self.tpot_ms = 0.0

    def observe(self, ttft_ms: float, tpot_ms: float) -> None:
        a = self.ALPHA
        self.ttft_ms = ttft_ms if self.ttft_ms == 0 else a * ttft_ms + (1 - a) * self.ttft_ms
        if tpot_ms > 0:
            self.tpot_ms = tpot_ms if self.tpot_ms == 0 else a * tpot_ms + (1 - a) * self.tpot_ms
