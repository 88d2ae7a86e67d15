"""A loopback TCP proxy the chaos run controls: partitions between one process and the broker.

A service whose `--nats-url` points at a `Proxy` reaches nats-server only
through it. Each accepted client connection gets its own upstream connection
(opened when the link lets bytes through), so the proxy outlives broker
restarts: when nats-server goes away the upstream side closes, the proxy
closes the client side, the client reconnects to the proxy, and the proxy
dials the (restarted) server again.

Modes:
- `pass`: bytes flow both ways as they come.
- `blackhole`: every connection stays open and nothing moves in either
  direction. The proxy stops reading its sockets, so what the peers write
  waits in their kernel buffers (at most one read already in hand waits in
  the proxy): a link that is silent, not broken. When the mode goes back to
  `pass` the held bytes flow on, in order, as after a healed partition
  (TCP retransmits; nothing is lost or duplicated). New connections are
  accepted and held the same way (no upstream dial until the link passes).
- `delay`: every read is forwarded `delay_ms` after it was read (order kept).
- `reset()`: an action, not a mode: every open connection is closed now with
  an RST (SO_LINGER 0) on both sides; the clients reconnect.

nats-py pings every 2 minutes by default, so a blackhole of seconds does not
make the client notice: that is the point (slow is not dead).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Callable

_READ = 65536
_QUEUE = 256  # reads in flight per direction in delay mode (back-pressure beyond)


def _rst(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN (the peer sees ECONNRESET)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, proxy: Proxy, client: socket.socket, n: int) -> None:
        self.proxy, self.client, self.n = proxy, client, n
        self.why = "open"
        self.upstream: socket.socket | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.runner: asyncio.Task[None] | None = None
        self.closed = False

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            # A blackholed link dials nothing: the client waits as on a silent network.
            await self.proxy.flowing.wait()
            up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            up.setblocking(False)
            up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.upstream = up
            try:
                await asyncio.wait_for(loop.sock_connect(up, ("127.0.0.1", self.proxy.upstream_port)),
                                       5.0)
            except (OSError, TimeoutError):
                self.proxy.refused += 1
                self.why = "upstream refused"
                return  # broker down: close the client side, it reconnects to us again
            self.tasks = [asyncio.create_task(self._pump(self.client, up, "c->s")),
                          asyncio.create_task(self._pump(up, self.client, "s->c"))]
            done, _ = await asyncio.wait(self.tasks, return_when=asyncio.FIRST_COMPLETED)
            self.why = "client closed" if self.tasks[0] in done else "upstream closed"
        except asyncio.CancelledError:
            pass
        finally:
            self.close(rst=False)

    async def _pump(self, src: socket.socket, dst: socket.socket, way: str) -> None:
        """Forward src -> dst; reads only while the link flows (blackhole: no read at all)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(_QUEUE)

        async def sender() -> None:
            while True:
                got = await queue.get()
                if got is None:
                    return
                due, data = got
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)  # the injected latency (delay mode), bounded by delay_ms
                await self.proxy.flowing.wait()  # a read in hand when the blackhole began waits
                await loop.sock_sendall(dst, data)
                self.proxy.forwarded[way] += len(data)

        send = asyncio.create_task(sender())
        try:
            while not send.done():
                await self.proxy.flowing.wait()
                data = await loop.sock_recv(src, _READ)
                if not data:
                    break
                await queue.put((time.monotonic() + self.proxy.delay_ms / 1000, data))
            if not send.done():
                await queue.put(None)
                await send  # flush what was read before the EOF
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            send.cancel()
            with contextlib.suppress(BaseException):
                await send

    def close(self, rst: bool) -> None:
        if self.closed:
            return
        self.closed = True
        if rst:
            self.why = "reset"
        if self.why != "upstream refused":
            self.proxy.log(f"proxy {self.proxy.name}: link {self.n} closed ({self.why})")
        for t in self.tasks:
            t.cancel()
        if self.runner is not None and self.runner is not asyncio.current_task():
            self.runner.cancel()
        for s in (self.client, self.upstream):
            if s is None:
                continue
            if rst:
                _rst(s)
            else:
                with contextlib.suppress(OSError):
                    s.close()
        self.proxy.links.discard(self)


class Proxy:
    """Listens on a free 127.0.0.1 port and forwards to `upstream_port` (nats-server)."""

    def __init__(self, name: str, upstream_port: int,
                 log: Callable[[str], None] = lambda _: None) -> None:
        self.name, self.upstream_port, self.log = name, upstream_port, log
        self.port = 0
        self.mode = "pass"
        self.delay_ms = 0.0
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.links: set[_Link] = set()
        self.accepted = 0
        self.refused = 0  # upstream dials that failed (broker down)
        self.forwarded: dict[str, int] = {"c->s": 0, "s->c": 0}
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._link_tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def passing(self) -> bool:
        return self.mode != "blackhole"

    async def start(self) -> Proxy:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        sock.setblocking(False)
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._task = asyncio.create_task(self._accept_loop(), name=f"proxy-{self.name}")
        return self

    async def _accept_loop(self) -> None:
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                client, _ = await loop.sock_accept(self._sock)
            except OSError:
                return
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.accepted += 1
            link = _Link(self, client, self.accepted)
            if self.mode == "blackhole":
                self.log(f"proxy {self.name}: link {link.n} accepted while blackholed (held)")
            self.links.add(link)
            task = asyncio.create_task(link.run())
            link.runner = task
            self._link_tasks.add(task)
            task.add_done_callback(self._link_tasks.discard)

    # -- the faults --------------------------------------------------------
    def set_pass(self) -> None:
        self.mode, self.delay_ms = "pass", 0.0
        self.flowing.set()
        self.log(f"proxy {self.name}: pass ({len(self.links)} connections)")

    def blackhole(self) -> None:
        self.mode = "blackhole"
        self.flowing.clear()
        self.log(f"proxy {self.name}: blackhole ({len(self.links)} connections held open)")

    def delay(self, ms: float) -> None:
        self.mode, self.delay_ms = "delay", ms
        self.flowing.set()
        self.log(f"proxy {self.name}: delay {ms:.0f} ms ({len(self.links)} connections)")

    def reset(self) -> int:
        """Close every open connection now with an RST; returns how many."""
        links = list(self.links)
        for link in links:
            link.close(rst=True)
        self.log(f"proxy {self.name}: reset {len(links)} connections")
        return len(links)

    async def close(self) -> None:
        self.flowing.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        for link in list(self.links):
            link.close(rst=False)
        tasks = list(self._link_tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)

    def stats(self) -> str:
        return (f"{self.name}: port {self.port} -> {self.upstream_port}, mode {self.mode}, "
                f"accepted {self.accepted}, open {len(self.links)}, upstream refused "
                f"{self.refused}, forwarded c->s {self.forwarded['c->s']} B "
                f"s->c {self.forwarded['s->c']} B")
