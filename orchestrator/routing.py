"""Which work subject a request goes to: its role's pool, or one worker. Pure.

While every live worker of the role serves the request's model, the pool
subject (`any`) lets whichever worker has room take it. When the pool mixes
models, the request goes to a worker that serves its model: the one with the
fewest items held per slot at its last heartbeat, counting what this
orchestrator sent it since (ties to the lowest id, so runs replay).
Richer strategies (affinity, prefix-aware, power of two) come with the
scheduling issue; they plug in here.
"""

from __future__ import annotations

from collections.abc import Mapping

from orchestrator.fleet import FleetView
from schemas.messages import Role
from schemas.subjects import ANY_TARGET


def choose_target(
    model: str, role: Role, fleet: FleetView, sent_since_hb: Mapping[str, int]
) -> str | None:
    """`any`, a worker id, or None when no live worker of `role` serves `model`."""
    pool = fleet.of_role(role)
    eligible = [w for w in pool if not model or model in w.models]
    if not eligible:
        return None
    if len(eligible) == len(pool):
        return ANY_TARGET
    best = min(
        eligible,
        key=lambda w: ((w.held_items + sent_since_hb.get(w.worker_id, 0)) / max(w.capacity, 1),
                       w.worker_id),
    )
    return best.worker_id
