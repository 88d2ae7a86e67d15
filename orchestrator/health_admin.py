"""Worker health as the orchestrator sees it: the registry with its breakers, and
what `<prefix>.admin.breakers` answers (the leader's breaker per worker, served
by orchestrator/control.py; `cplane workers` shows it)."""

from __future__ import annotations

import msgspec

from cplane.orchestrator.breaker import BreakerParams, Breakers
from cplane.orchestrator.fleet import Registry
from cplane.schemas.admin import BreakerInfo
from cplane.schemas.settings import Settings


def build_registry(settings: Settings) -> Registry:
    """The worker registry, with breakers unless switched off (bad params fail here)."""
    o = settings.orchestrator
    breakers = (Breakers(msgspec.convert(o.breaker_params, BreakerParams))
                if o.breakers else None)
    return Registry(timeout_ms=o.worker_timeout_s * 1000, breakers=breakers)


def breaker_infos(breakers: Breakers) -> list[BreakerInfo]:
    """Each worker's breaker the leader tracks, by worker id (`<prefix>.admin.breakers`)."""
    return [BreakerInfo(worker_id=w, state=str(st), reason=why)
            for w, (st, why) in sorted(breakers.states().items())]


__all__ = ["breaker_infos", "build_registry"]
