"""Worker registry from heartbeats, and the fleet snapshot decisions read.

No I/O: the service feeds heartbeats in and asks for a `FleetView`.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.messages import Heartbeat, Role, WorkerState


@dataclass(frozen=True, slots=True)
class WorkerView:
    worker_id: str
    role: Role
    models: tuple[str, ...]
    capacity: int
    held_items: int
    running: int
    waiting: int
    kv_usage: float
    last_seen_ms: float


@dataclass(frozen=True, slots=True)
class FleetView:
    """Live, ready workers at one instant."""

    workers: tuple[WorkerView, ...] = ()

    def of_role(self, role: Role, model: str = "") -> tuple[WorkerView, ...]:
        return tuple(
            w for w in self.workers if w.role is role and (not model or model in w.models)
        )

    def capacity(self, role: Role, model: str = "") -> int:
        return sum(w.capacity for w in self.of_role(role, model))

    def max_worker_capacity(self) -> int:
        return max((w.capacity for w in self.workers), default=0)

    @property
    def models(self) -> frozenset[str]:
        return frozenset(m for w in self.workers for m in w.models)

    def serves(self, model: str) -> bool:
        return not model or model in self.models

    def pd_capacity(self, model: str = "") -> int:
        """Requests a prefill+decode pair can hold: the decode side is the long part."""
        if not self.of_role(Role.PREFILL, model):
            return 0
        return self.capacity(Role.DECODE, model)


class Registry:
    """Latest heartbeat per worker; a worker unseen for `timeout_ms` is gone."""

    def __init__(self, timeout_ms: float) -> None:
        self.timeout_ms = timeout_ms
        self._latest: dict[str, tuple[Heartbeat, float]] = {}

    def observe(self, hb: Heartbeat, now_ms: float) -> bool:
        """Record a heartbeat; True when the fleet's shape changed (new, gone, capacity)."""
        prev = self._latest.get(hb.worker_id)
        if hb.state == WorkerState.STOPPED:
            self._latest.pop(hb.worker_id, None)
            return prev is not None
        self._latest[hb.worker_id] = (hb, now_ms)
        return prev is None or prev[0].capacity != hb.capacity or prev[0].state != hb.state

    def expire(self, now_ms: float) -> list[str]:
        gone = [w for w, (_, seen) in self._latest.items() if now_ms - seen > self.timeout_ms]
        for w in gone:
            del self._latest[w]
        return gone

    def snapshot(self, now_ms: float) -> FleetView:
        workers = []
        for hb, seen in self._latest.values():
            if now_ms - seen > self.timeout_ms or hb.state != WorkerState.READY:
                continue
            workers.append(
                WorkerView(
                    worker_id=hb.worker_id,
                    role=hb.role,
                    models=tuple(hb.models),
                    capacity=hb.capacity,
                    held_items=hb.held_items,
                    running=hb.running,
                    waiting=hb.waiting,
                    kv_usage=hb.kv_usage,
                    last_seen_ms=seen,
                )
            )
        return FleetView(tuple(workers))
