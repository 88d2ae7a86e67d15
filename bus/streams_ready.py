"""A process that is not the orchestrator waits for the streams instead of making them.

Under least privilege (docs/security.md) only orchestrators may create streams;
a worker started first, or one whose broker lost its store, waits until an
orchestrator has provisioned them. Where the principal may create them (the
single-account default, `cplane up` without --auth) it still does, so the
order processes start in does not matter there.
"""

from __future__ import annotations

import asyncio
import logging

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from cplane.bus.provision import TRANSIENT_API_ERRORS, ensure_stream, stream_configs
from cplane.schemas.settings import Settings

log = logging.getLogger("cplane.provision")


async def streams_ready(js: JetStreamContext, settings: Settings, poll_s: float = 0.5) -> None:
    """Return once every stream exists (made here when this principal may)."""
    told = False
    for cfg in stream_configs(settings):
        assert cfg.name is not None
        while True:
            try:
                await js.stream_info(cfg.name)
                break
            except (NotFoundError, *TRANSIENT_API_ERRORS):  # a busy or electing cluster
                pass
            try:
                await ensure_stream(js, cfg, update=False)
                break
            except Exception as exc:  # not allowed to: an orchestrator provisions it
                if not told:
                    log.info("waiting for an orchestrator to provision stream %s (%s)",
                             cfg.name, exc)
                    told = True
                await asyncio.sleep(poll_s)
