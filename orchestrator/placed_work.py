"""Tokens routed to each worker lately, decaying: a work measure for routers that
must not pile long requests on one worker. Pure data.

Decay is one shared factor, not a pass over every worker: values are stored
divided by it, so decaying is O(1), the stored values keep their order (an
index ordered by them stays valid), and the fleet's total decays with them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

# An hour: a window holding many requests per worker even on large fleets, where
# ten minutes left a few long prompts deciding the cap (64 workers, Mooncake).
HALF_LIFE_MS = 3_600_000.0
_RENORMALIZE_BELOW = 1e-12


class PlacedWork(Mapping[str, float]):
    """worker id -> decayed tokens routed to it (prompt + output)."""

    def __init__(self, half_life_ms: float = HALF_LIFE_MS) -> None:
        self.half_life_ms = half_life_ms
        self._raw: dict[str, float] = {}  # value / scale
        self._scale = 1.0
        self._raw_total = 0.0
        self._at_ms = 0.0
        self.epoch = 0  # bumped when stored values were rewritten (renormalized)

    def __getitem__(self, worker_id: str) -> float:
        return self._raw[worker_id] * self._scale

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    def get(self, worker_id: str, default: float = 0.0) -> float:  # type: ignore[override]
        r = self._raw.get(worker_id)  # (Mapping.get would raise and catch per miss)
        return default if r is None else r * self._scale

    def raw(self, worker_id: str) -> float:
        """The stored value: ordered as the decayed ones, unchanged by decay."""
        return self._raw.get(worker_id, 0.0)

    def to_raw(self, tokens: float) -> float:
        return tokens / self._scale

    @property
    def total(self) -> float:
        return self._raw_total * self._scale

    def add(self, worker_id: str, tokens: float) -> None:
        r = tokens / self._scale
        self._raw[worker_id] = self._raw.get(worker_id, 0.0) + r
        self._raw_total += r

    def set(self, worker_id: str, value: float) -> None:
        old = self._raw.get(worker_id, 0.0)
        self._raw[worker_id] = value / self._scale
        self._raw_total += value / self._scale - old

    def forget(self, worker_id: str) -> None:
        self._raw_total -= self._raw.pop(worker_id, 0.0)

    def decay(self, now_ms: float) -> None:
        dt = now_ms - self._at_ms
        if dt < 100.0:
            return
        self._at_ms = now_ms
        self._scale *= 0.5 ** (dt / self.half_life_ms)
        if self._scale < _RENORMALIZE_BELOW:
            self._raw = {w: v * self._scale for w, v in self._raw.items()}
            self._raw_total *= self._scale
            self._scale = 1.0
            self.epoch += 1


__all__ = ["HALF_LIFE_MS", "PlacedWork"]
