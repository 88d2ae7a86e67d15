"""A service's side of the control subjects (`<prefix>.admin.*`) and its `/metrics`
server, started and stopped as one (orchestrator/control.py, workers/control.py).

Each subject is answered on a core request/reply subscription without a queue
group: every replica or worker answers and the asker aggregates
(client/control.py). An `Answer` maps the request's body to the reply's, or to
None to stay silent (a worker that does not hold the request asked about, a
standby orchestrator asked for the leader's breakers); a message without a
reply subject is ignored. Nothing here is on the dispatch path.

Every handler of a control subject (these, the policy switch, a worker's
heartbeat and KV-snapshot requests) first asks `ADMIN_GUARD.admit(msg, served)`:
a message that did not come straight to the subject served is refused,
counted and never applied. A client may create a push consumer on a stream it
can write (its batch bucket) whose delivery subject is `llm.admin.policy`: the
server checks no permission for that delivery. Such a message keeps the stored
message's subject (`$KV.llm_batches.x`) and a `$JS.ACK.` reply; a RePublish
adds `Nats-Stream`/`Nats-Sequence` headers; a push consumer's heartbeats and
flow control carry a `Status` header or a `$JS.FC.` reply.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

log = logging.getLogger("cplane.control")
Answer = Callable[[bytes], Awaitable[bytes | None]]
JS_REPLY_PREFIX = "$JS."  # acks ($JS.ACK.) and flow control ($JS.FC.) of a JetStream delivery
# Headers the server sets on what a stream delivers or republishes (lower case).
JS_HEADERS = frozenset({"nats-stream", "nats-sequence", "nats-subject", "nats-last-sequence",
                        "nats-time-stamp", "status"})
REFUSAL_LOG_EVERY_S = 60.0


def sideways(msg: Msg, served: str) -> str | None:
    """Why `msg` did not come straight to the subject `served`; None when it did."""
    if msg.subject != served:
        return f"delivered from {msg.subject!r}"
    if msg.reply.startswith(JS_REPLY_PREFIX):
        return f"JetStream reply {msg.reply!r}"
    found = sorted(h for h in msg.headers or {} if h.lower() in JS_HEADERS)
    return f"JetStream headers {', '.join(found)}" if found else None


class AdminGuard:
    """Admits the control messages that came straight; counts the others (by the
    subject served) and logs them at most once per `log_every_s`. Never raises."""

    def __init__(self, log_every_s: float = REFUSAL_LOG_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.refused = 0
        self.by_subject: Counter[str] = Counter()
        self._log_every_s = log_every_s
        self._clock = clock
        self._logged_at = float("-inf")
        self._unlogged = 0

    def admit(self, msg: Msg, served: str) -> bool:
        """True when `msg` may be applied as a request on `served`."""
        why = sideways(msg, served)
        if why is None:
            return True
        self.refused += 1
        self.by_subject[served] += 1
        self._unlogged += 1
        now = self._clock()
        if now - self._logged_at >= self._log_every_s:
            log.warning("refused %d control message(s) that did not come straight to their "
                        "subject (the last on %s: %s); a push consumer or RePublish aimed at "
                        "it?", self._unlogged, served, why)
            self._logged_at, self._unlogged = now, 0
        return False


# One per process: every control handler counts its refusals here (the
# orchestrator's report shows them as the counter `admin_refused`).
ADMIN_GUARD = AdminGuard()


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
        self._subs = [await self.nc.subscribe(subject, cb=self._responder(subject, answer))
                      for subject, answer in self.answers.items()]
        if self._serve_metrics is not None:
            self._server = self._serve_metrics()
            self.metrics_port = self._server.server_port
            host = self._server.server_address[0]
            log.info("%s: metrics on http://%s:%d/metrics (probes: /healthz, /readyz)",
                     self.name, host, self.metrics_port)

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

    def _responder(self, subject: str, answer: Answer) -> Callable[[Msg], Awaitable[None]]:
        async def on_msg(msg: Msg) -> None:
            if not ADMIN_GUARD.admit(msg, subject) or not msg.reply:
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


__all__ = ["ADMIN_GUARD", "AdminGuard", "Answer", "ControlEndpoint", "sideways"]
