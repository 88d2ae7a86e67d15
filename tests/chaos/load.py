"""The load of the chaos run: raw JSON requests published the README's way, and the overload.

The requests come from tenants (tenants.py), split between them in turn:
each one's connection is on its own account, and its request id names it
(`cx<tag>-<tenant>-<n>`: the spies tell whose a message is). Each request is
a JetStream publish, on its tenant's connection, to `llm.req.<priority>.<slo_class>`
(the server maps it to `llm.req.<tenant>.<priority>.<slo_class>` in the
system's account, and the PubAck back; a quarter interactive: sheddable, so
overload is also answered by admission control with `overloaded`; the rest
standard) with header `Nats-Msg-Id: <request_id>`. Some share a session (`session_id`: session
routers keep them on one worker) or open with one of a few long common
prefixes (prefix routers place them where that prefix went). A seeded share
(`long_share`) are long generations: `long_tokens` tokens (20-40 s on the sim
engine), standard class. Outcomes of a publish:
- acked by JetStream (a duplicate ack on a retry counts too): accepted;
- an explicit error from the server (stream full, `discard=new`): refused,
  counted by its description;
- a timeout, a reconnecting connection or no responders (broker restarting):
  retried with the same Nats-Msg-Id (the server dedups) until `retry_s` runs
  out; then it is ambiguous (neither accepted nor refused, reported apart).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter, deque
from collections.abc import Callable

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS

from cplane.schemas.subjects import Subjects, pool_of
from tests.chaos.tenants import tenant_marker

SUBJECTS = Subjects()

PRIORITY_WEIGHTS = {"critical": 1, "high": 2, "normal": 4, "low": 2, "background": 1}
WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
         "november oscar papa quebec romeo sierra tango uniform victor whiskey xray").split()
# JetStream error codes of a stream at its limits (discard=new): an explicit refusal.
LIMIT_CODES = {10077, 10047, 10054}
TRANSIENT = (nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError,
             nats.errors.ConnectionReconnectingError, nats.errors.NoRespondersError,
             nats.errors.ConnectionClosedError, nats.errors.StaleConnectionError, TimeoutError,
             OSError)
SESSIONS = 6


def _prefixes() -> tuple[str, ...]:
    """Three fixed ~100-word openings (several prefix blocks each)."""
    return tuple(" ".join(WORDS[(k * 7 + i * (k + 3)) % len(WORDS)] for i in range(100))
                 for k in range(3))


PREFIXES = _prefixes()


class Publisher:
    def __init__(self, ncs: dict[str, NATS], total: int, base_rate: float, rng: random.Random,
                 tag: str, log: Callable[[str], None], retry_s: float = 45.0,
                 long_share: float = 0.0, long_tokens: tuple[int, int] = (3000, 5500),
                 partitions: tuple[str, ...] = ()) -> None:
        """`ncs`: each tenant's connection (on its own account), by tenant name.
        `partitions` (partitioned leadership): each request names one of these models,
        and half go to its pool's subject, half the old way (the default partition's
        leader forwards those)."""
        self.tenants = tuple(ncs)
        self.js = {t: nc.jetstream() for t, nc in ncs.items()}
        self.total, self.base_rate, self.rng, self.tag, self.log = total, base_rate, rng, tag, log
        self.retry_s = retry_s
        self.long_share, self.long_tokens = long_share, long_tokens
        self.partitions = partitions
        self.accepted: dict[str, float] = {}  # request id -> time of its ack
        # every publish: (monotonic first try, its ack or refusal; None: never answered)
        self.waits: list[tuple[float, float | None]] = []
        self.bodies: dict[str, tuple[str, bytes]] = {}  # request id -> (subject, body) published
        self.tenant_of: dict[str, str] = {}  # request id -> the tenant that publishes it
        self.long: dict[str, int] = {}  # long generations: request id -> max_tokens
        self.refused: Counter[str] = Counter()
        self.ambiguous: set[str] = set()
        self.retries = 0
        self.last_accept = 0.0  # monotonic time of the latest acceptance
        self.inflight = 0
        self.launched = 0
        self.overload_until = 0.0
        self.overload_accepted = 0
        self.overload_refused = 0
        self.completions: Callable[[], int] = lambda: 0
        self.gave_up = False
        self.done = asyncio.Event()
        self._sem = asyncio.Semaphore(256)
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def refused_total(self) -> int:
        return sum(self.refused.values())

    def progress(self) -> float:
        return len(self.accepted) / max(1, self.total)

    def overloaded(self) -> bool:
        return time.monotonic() < self.overload_until

    def body(self, rid: str) -> tuple[str, bytes]:
        prio = self.rng.choices(list(PRIORITY_WEIGHTS), weights=list(PRIORITY_WEIGHTS.values()))[0]
        prompt = " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(4, 40)))
        if self.rng.random() < 0.3:
            prompt = self.rng.choice(PREFIXES) + " " + prompt
        long = self.rng.random() < self.long_share
        max_tokens = self.rng.randint(*self.long_tokens) if long else self.rng.randint(8, 64)
        req: dict[str, object] = {
            "request_id": rid,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": round(self.rng.uniform(0.5, 1.0), 3),
            "created_ms": time.time() * 1000,
        }
        if self.rng.random() < 0.3:
            req["session_id"] = f"s{self.rng.randrange(SESSIONS)}"
        slo = "interactive" if not long and self.rng.random() < 0.25 else "standard"
        pool = ""
        if self.partitions:
            req["model"] = self.rng.choice(self.partitions)
            if self.rng.random() < 0.5:
                pool = pool_of(str(req["model"]), self.partitions)
        subject, data = SUBJECTS.request(prio, slo, None, pool), json.dumps(req).encode()
        self.bodies[rid] = (subject, data)
        if long:
            self.long[rid] = max_tokens
        return subject, data

    async def publish_one(self, rid: str) -> None:
        subject, data = self.body(rid)
        js = self.js[self.tenant_of[rid]]
        in_overload = self.overloaded()
        first = time.monotonic()
        deadline = first + self.retry_s
        answered: float | None = None
        try:
            while True:
                try:
                    await js.publish(subject, data, timeout=2.0, headers={"Nats-Msg-Id": rid})
                    self.accepted[rid] = answered = self.last_accept = time.monotonic()
                    self.overload_accepted += in_overload
                    return
                except nats.js.errors.APIError as exc:
                    if exc.err_code in LIMIT_CODES or time.monotonic() > deadline:
                        self.refused[f"{exc.err_code} {exc.description}"] += 1
                        self.overload_refused += in_overload
                        answered = time.monotonic()
                        return
                    self.log(f"publish {rid}: transient API error {exc!r}, retrying")
                except TRANSIENT as exc:
                    if time.monotonic() > deadline:
                        self.ambiguous.add(rid)
                        self.log(f"publish {rid}: AMBIGUOUS after {self.retry_s}s: {exc!r}")
                        return
                self.retries += 1
                await asyncio.sleep(0.25)  # back-off before a retry (bounded by retry_s)
        finally:
            self.waits.append((first, answered))
            self.inflight -= 1
            self._sem.release()

    async def publish_again(self, rid: str, retry_s: float = 20.0) -> str:
        """Publish an accepted request's very body again, same Nats-Msg-Id, through the
        same tenant (a client resubmitting an id); retried on transient errors for `retry_s`. Returns
        "accepted", "duplicate" (JetStream dropped it: still in its window),
        "refused <error>" or "ambiguous"."""
        subject, data = self.bodies[rid]
        js = self.js[self.tenant_of[rid]]
        deadline = time.monotonic() + retry_s
        while True:
            try:
                ack = await js.publish(subject, data, timeout=2.0,
                                            headers={"Nats-Msg-Id": rid})
                return "duplicate" if ack.duplicate else "accepted"
            except nats.js.errors.APIError as exc:
                if exc.err_code in LIMIT_CODES or time.monotonic() > deadline:
                    return f"refused {exc.err_code} {exc.description}"
            except TRANSIENT:
                if time.monotonic() > deadline:
                    return "ambiguous"
            await asyncio.sleep(0.25)  # back-off before a retry (bounded by retry_s)

    async def _launch(self) -> None:
        await self._sem.acquire()
        tenant = self.tenants[self.launched % len(self.tenants)]
        rid = f"cx{self.tag}{tenant_marker(tenant)}{self.launched:06d}"
        self.tenant_of[rid] = tenant
        self.launched += 1
        self.inflight += 1
        task = asyncio.create_task(self.publish_one(rid))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def start_overload(self, seconds: float) -> None:
        self.overload_until = time.monotonic() + seconds
        self.log(f"overload phase: {seconds:.0f}s at 3x the fleet's completion rate")

    async def run(self, limit_s: float, stall_s: float = 60.0) -> None:
        """Publish until `total` requests are accepted: paced at `base_rate`, or 3x in overload.

        Gives up launching after `limit_s`, or once nothing was accepted for `stall_s`
        (a system that accepts nothing must still end in a figures line); publishes in
        flight then finish within `retry_s`. The stall bound is what tells a stuck system
        from a slow one: a full request stream admits as fast as the fleet completes, and
        how fast that is under the faults depends on the seed's long generations.
        """
        start = time.monotonic()
        give_up = start + limit_s
        window: deque[tuple[float, int]] = deque(maxlen=200)
        credit = 0.0
        last = time.monotonic()
        burst_done = False
        phase = (0.0, 0, 0)
        while len(self.accepted) + self.inflight < self.total or self.inflight:
            now = time.monotonic()
            quiet = now - max(self.last_accept, start)
            if (now > give_up or quiet > stall_s) and not self.gave_up:
                self.gave_up = True
                self.log(f"LOAD GAVE UP after {now - start:.0f}s ({quiet:.0f}s since the "
                         f"last acceptance): accepted={len(self.accepted)}")
            if self.gave_up:
                if not self.inflight:
                    break
                await asyncio.sleep(0.1)  # poll the in-flight publishes to finish
                continue
            window.append((now, self.completions()))
            dt, last = now - last, now
            if self.overloaded():
                # what the fleet completes now (over ~3 s), times three; a burst to fill it first
                old = next((w for w in window if now - w[0] <= 3.0), window[0])
                rate = (window[-1][1] - old[1]) / max(0.5, now - old[0])
                credit += dt * 3 * max(rate, self.base_rate)
                if not burst_done:
                    credit += 40
                    burst_done = True
                    phase = (now, self.completions(), self.launched)
            else:
                credit = min(credit + dt * self.base_rate, 5.0)
                if burst_done:
                    span = max(0.1, now - phase[0])
                    self.log("overload phase done: %.1fs, fleet completed %.1f/s, published "
                             "%.1f/s (accepted %d, refused %d)" % (
                                 span, (self.completions() - phase[1]) / span,
                                 (self.launched - phase[2]) / span, self.overload_accepted,
                                 self.overload_refused))
                burst_done = False
            while credit >= 1 and len(self.accepted) + self.inflight < self.total:
                credit -= 1
                await self._launch()
            await asyncio.sleep(0.02)  # the load generator's pacing tick (sets the rate)
        self.done.set()

    async def cancel(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
