"""Admin requests to the orchestrator replicas (what `cplane policy` / `router` send).

    admin = Admin(nc, settings)
    reply = await admin.set_policy("fifo", {})      # AdminReply: ok, or refused with choices
    reply = await admin.get_policy()                # reply.state: name, params, by, updated_ms
    reply = await admin.set_router("least_loaded")  # reply.router_state; reply.router in force
    reply = await admin.get_router()

One core request/reply on `<prefix>.admin.policy` (or `.router`); one replica answers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError

from cplane.schemas.admin import (
    AdminReply,
    PolicyCommand,
    PolicyGet,
    PolicySet,
    RouterCommand,
    RouterGet,
    RouterSet,
    admin_reply_decoder,
)
from cplane.schemas.codec import encode
from cplane.schemas.settings import Settings

DEFAULT_ADMIN_TIMEOUT_S = 5.0


class NoOrchestrator(ConnectionError):
    """No orchestrator replica answered the admin request (none runs, or none in time)."""


class Admin:
    def __init__(self, nc: NATS, settings: Settings,
                 timeout_s: float = DEFAULT_ADMIN_TIMEOUT_S) -> None:
        self.nc = nc
        self.settings = settings
        self.timeout_s = timeout_s

    async def get_policy(self) -> AdminReply:
        """The fleet's policy choice (the stored one, else the answering replica's settings)."""
        return await self._ask(self.settings.subjects.admin_policy, PolicyGet())

    async def set_policy(self, name: str, params: Mapping[str, Any] | None = None,
                         by: str = "") -> AdminReply:
        """Switch every replica to `name`; `ok=False` (nothing stored) names the valid choices."""
        return await self._ask(self.settings.subjects.admin_policy,
                               PolicySet(name=name, params=dict(params or {}), by=by))

    async def get_router(self) -> AdminReply:
        """The fleet's router choice (`reply.router_state`: the stored one, else the answering
        replica's settings) and the router in force (`reply.router`: a policy's own wins)."""
        return await self._ask(self.settings.subjects.admin_router, RouterGet())

    async def set_router(self, name: str, params: Mapping[str, Any] | None = None,
                         by: str = "") -> AdminReply:
        """Switch every replica to router `name`; `ok=False` (nothing stored) names the
        valid choices."""
        return await self._ask(self.settings.subjects.admin_router,
                               RouterSet(name=name, params=dict(params or {}), by=by))

    async def _ask(self, subject: str, cmd: PolicyCommand | RouterCommand) -> AdminReply:
        try:
            msg = await self.nc.request(subject, encode(cmd), timeout=self.timeout_s)
        except NoRespondersError:
            raise NoOrchestrator(f"no orchestrator listens on {subject}") from None
        except TimeoutError:  # nats.errors.TimeoutError is one too
            raise NoOrchestrator(
                f"no orchestrator answered on {subject} within {self.timeout_s:g} s") from None
        return admin_reply_decoder.decode(msg.data)


__all__ = ["DEFAULT_ADMIN_TIMEOUT_S", "Admin", "NoOrchestrator"]
