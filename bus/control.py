"""A service's side of the control subjects (`<prefix>.admin.*`) and its `/metrics`
server, started and stopped as one (orchestrator/control.py, workers/control.py).

Each subject is answered on a core request/reply subscription without a queue
group: every replica or worker answers and the asker aggregates
(client/control.py). An `Answer` maps the request's body to the reply's, or to
None to stay silent (a worker that does not hold the request asked about, a
standby orchestrator asked for the leader's breakers); a message without a
reply subject is ignored. Nothing here is on the dispatch path.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

log = logging.getLogger("cplane.control")
Answer = Callable[[bytes], Awaitable[bytes | None]]


class ControlEndpoint:
    """Answers `answers` (subject -> Answer) on `nc`, and serves `/metrics` from
    `serve_metrics()` when one is given (port 0 in the settings: none)."""

    def __init__(self, nc: NATS, answers: Mapping[str, Answer],
                 serve_metrics: Callable[[], WSGIServer] | None = None,
                 name: str = "") -> None:
        self.nc = nc
        self.answers = dict(answers)
        self._serve_metrics = serve_metrics
        self.name = name  # for the log
        self._subs: list[Subscription] = []
        self._server: WSGIServer | None = None
        self.metrics_port = 0  # where /metrics listens (0 = not served)

    async def start(self) -> None:
        self._subs = [await self.nc.subscribe(subject, cb=self._responder(answer))
                      for subject, answer in self.answers.items()]
        if self._serve_metrics is not None:
            self._server = self._serve_metrics()
            self.metrics_port = self._server.server_port
            host = self._server.server_address[0]
            log.info("%s: metrics on http://%s:%d/metrics", self.name, host, self.metrics_port)

    async def stop(self) -> None:
        """Unsubscribe and close the metrics server; safe to call twice."""
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs = []
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _responder(self, answer: Answer) -> Callable[[Msg], Awaitable[None]]:
        async def on_msg(msg: Msg) -> None:
            if not msg.reply:
                return
            try:
                data = await answer(msg.data)
            except Exception:  # one bad answer must not end the subscription
                log.exception("%s: answering %s failed", self.name, msg.subject)
                return
            if data is not None:
                with contextlib.suppress(Exception):  # the asker may be gone
                    await self.nc.publish(msg.reply, data)

        return on_msg


__all__ = ["Answer", "ControlEndpoint"]
