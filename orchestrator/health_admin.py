"""Worker health as the orchestrator sees it: the registry with its breakers, and
`<prefix>.admin.breakers` (request/reply), answered by the leader with each
worker's breaker state (`cplane workers` shows it)."""

from __future__ import annotations

from collections.abc import Callable

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from orchestrator.breaker import BreakerParams, Breakers
from orchestrator.fleet import Registry
from schemas.admin import BreakerInfo
from schemas.codec import encode
from schemas.settings import Settings


def build_registry(settings: Settings) -> Registry:
    """The worker registry, with breakers unless switched off (bad params fail here)."""
    o = settings.orchestrator
    breakers = (Breakers(msgspec.convert(o.breaker_params, BreakerParams))
                if o.breakers else None)
    return Registry(timeout_ms=o.worker_timeout_s * 1000, breakers=breakers)


async def serve_breakers(nc: NATS, settings: Settings, registry: Registry,
                         leading: Callable[[], bool]) -> Subscription:
    async def on_request(msg: Msg) -> None:
        if not msg.reply or not leading() or registry.breakers is None:
            return  # the leader's breakers are the ones that route
        infos = [BreakerInfo(worker_id=w, state=str(st), reason=why)
                 for w, (st, why) in sorted(registry.breakers.states().items())]
        await nc.publish(msg.reply, encode(infos))

    return await nc.subscribe(settings.subjects.admin("breakers"), cb=on_request)


__all__ = ["build_registry", "serve_breakers"]
