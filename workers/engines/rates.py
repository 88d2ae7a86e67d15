"""Token rates over a sliding window, for heartbeats."""

from __future__ import annotations

import time
from collections import deque


class RateWindow:
    """Counts prompt and generated tokens; reports per-second rates over `window_s`."""

    def __init__(self, window_s: float = 5.0) -> None:
        self.window_s = window_s
        self._prompt = 0
        self._gen = 0
        # (monotonic time, cumulative prompt, cumulative gen), one sample per 0.5 s at most
        self._samples: deque[tuple[float, int, int]] = deque([(time.monotonic(), 0, 0)])

    def add(self, prompt: int, gen: int) -> None:
        self._prompt += prompt
        self._gen += gen
        now = time.monotonic()
        if now - self._samples[-1][0] >= 0.5:
            self._samples.append((now, self._prompt, self._gen))
            while len(self._samples) > 2 and now - self._samples[1][0] >= self.window_s:
                self._samples.popleft()

    def rates(self) -> tuple[float, float]:
        """(prompt tokens/s, generated tokens/s) over the window."""
        now = time.monotonic()
        t0, p0, g0 = self._samples[0]
        dt = now - t0
        if dt <= 0:
            return 0.0, 0.0
        return (self._prompt - p0) / dt, (self._gen - g0) / dt
