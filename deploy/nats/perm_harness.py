"""The scaffolding of check_permissions.py: a scratch server with accounts.conf, one
connection per user, and checks that a call is refused with a permissions violation."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import nats
from nats.js.errors import KeyNotFoundError

from cplane.bus.server import free_port, nats_server_binary
from cplane.schemas.codec import encode
from cplane.schemas.messages import Priority, Request, WorkBatch, WorkItem

HERE = Path(__file__).resolve().parent

PASSWORDS = {
    "CPLANE_CLIENT_PASSWORD": "client-pw",
    "CPLANE_ORCHESTRATOR_PASSWORD": "orchestrator-pw",
    "CPLANE_WORKER_PASSWORD": "worker-pw",
    "CPLANE_ADMIN_PASSWORD": "admin-pw",
    "NATS_SYS_PASSWORD": "sys-pw",
}
MODEL = "org/m-1"  # a model name with characters a subject token cannot hold
VIOLATION = "permissions violation"


class Checks:
    def __init__(self) -> None:
        self.failed: list[str] = []
        self.count = 0

    def ok(self, name: str, cond: bool, detail: str = "") -> None:
        self.count += 1
        print(
            ("PASS " if cond else "FAIL ") + name + (f"  [{detail}]" if detail and not cond else "")
        )
        if not cond:
            self.failed.append(name)


def start_server(tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    port, http = free_port(), free_port()
    conf = (HERE / "single.conf").read_text()
    conf = conf.replace("listen: 0.0.0.0:4222", f"listen: 127.0.0.1:{port}")
    conf = conf.replace("http_port: 8222", f"http_port: {http}")
    conf = re.sub(r'store_dir: "[^"]*"', f'store_dir: "{tmp / "js"}"', conf)
    conf = conf.replace("# include ./accounts.conf", "include ./accounts.conf")
    (tmp / "nats.conf").write_text(conf)
    shutil.copy(HERE / "accounts.conf", tmp / "accounts.conf")
    env = {**os.environ, **PASSWORDS}
    with open(tmp / "server.log", "wb") as log:
        proc = subprocess.Popen(
            [nats_server_binary(), "-c", str(tmp / "nats.conf")],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError((tmp / "server.log").read_text()) from None
            time.sleep(0.05)
    raise TimeoutError("nats-server did not start")


Conn = tuple[nats.NATS, list[str]]


async def connect(port: int, user: str) -> Conn:
    errs: list[str] = []

    async def on_error(e: Exception) -> None:
        errs.append(str(e).lower())

    pw = PASSWORDS[f"CPLANE_{user.upper()}_PASSWORD"]
    nc = await nats.connect(
        f"nats://{user}:{pw}@127.0.0.1:{port}", error_cb=on_error, max_reconnect_attempts=0
    )
    return nc, errs


async def registered(*ncs: nats.NATS) -> None:
    """Return once every subscription made so far on each connection is live at the server.

    A bare `await nc.flush()` after `nc.subscribe(...)` does not promise that: nats-py
    (2.16) leaves the SUB in its pending buffer for the flusher task, while flush()
    writes its PING straight to the socket, ahead of the SUB. The server answers that
    PING before it has read the SUB, so a message another connection publishes right
    after can find no interest and be dropped. (That was the flake `FAIL worker copies
    outputs to an _INBOX reply_to  [[]]`: 155 of 2,000 subscribe-flush-publish rounds
    lost their message in a loop on this machine.) By the time the first PONG is back,
    the flusher has written the SUB; the second PING goes after it, so the second PONG
    proves the server registered it (a connection's commands are handled in order)."""
    for nc in ncs:
        await nc.flush()
        await nc.flush()


def _violation(errs: list[str], n: int, subject: str = "") -> bool:
    return any(VIOLATION in e and subject.lower() in e for e in errs[n:])


async def denied(c: Checks, name: str, coro: Awaitable[object], errs: list[str]) -> None:
    """`coro` must not succeed, and the server must report a permissions violation.

    The server drops a denied request and says so at once (the error callback); the
    call itself would only fail at its own timeout (1-3 s) since no reply can come. So
    the check ends at the violation: the call is cancelled then (it had not succeeded)."""
    n = len(errs)
    task = asyncio.ensure_future(coro)
    deadline = time.monotonic() + 3
    while not task.done() and not _violation(errs, n) and time.monotonic() < deadline:
        await asyncio.wait({task}, timeout=0.02)
    if task.done() and task.exception() is None:
        c.ok(name, False, "allowed")
        return
    if not task.done():
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        c.ok(name, _violation(errs, n), "no violation reported within 3 s")
        return
    # It failed before the violation was seen (the error callback runs as its own task).
    c.ok(name, await until(lambda: _violation(errs, n), 3), repr(task.exception()))


async def pub_denied(c: Checks, name: str, conn: Conn, subject: str) -> None:
    """A core publish to `subject` must be refused (the server says so; nothing raises)."""
    nc, errs = conn
    n = len(errs)
    await nc.publish(subject, b"forged")
    await nc.flush()
    c.ok(name, await until(lambda: _violation(errs, n, subject), 3), str(errs[n:]))


def work_batch(rid: str, model: str = MODEL) -> bytes:
    req = Request(request_id=rid, model=model, prompt="hi", max_tokens=4)
    return encode(WorkBatch(items=[WorkItem(request=req, priority=Priority.NORMAL,
                                            slo_class="standard")]))


async def kv_value(adm: nats.NATS, bucket: str, key: str) -> bytes | None:
    kv = await adm.jetstream().key_value(bucket)
    try:
        return (await kv.get(key)).value
    except KeyNotFoundError:  # also a deleted key (KeyDeletedError)
        return None


async def sub_denied(c: Checks, name: str, conn: Conn, subject: str) -> None:
    """A subscription to `subject` must be refused (the server says so; nothing raises)."""
    nc, errs = conn
    n = len(errs)
    sub = await nc.subscribe(subject)
    await nc.flush()
    c.ok(name, await until(lambda: _violation(errs, n, subject), 3), str(errs[n:]))
    with contextlib.suppress(Exception):
        await sub.unsubscribe()


async def until(cond: Callable[[], object], timeout_s: float = 10.0) -> bool:
    """Wait for `cond` (a plain or async callable, polled every 20 ms); its last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        ok = cond()
        if inspect.isawaitable(ok):
            ok = await ok
        if ok or time.monotonic() >= deadline:
            return bool(ok)
        await asyncio.sleep(0.02)


async def quiet_for(seconds: float, seen: Callable[[], object]) -> bool:
    """True when `seen()` stays false for `seconds`: a check that something does NOT
    happen can only watch for a while (there is no event for "never"), so this is the
    one fixed wait, named and bounded. Returns early (False) as soon as it happens."""
    return not await until(seen, seconds)
