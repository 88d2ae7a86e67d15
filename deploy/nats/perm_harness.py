"""The scaffolding of check_permissions.py: a scratch server with accounts.conf, one
connection per user, and checks that a call is refused with a permissions violation."""

from __future__ import annotations

import asyncio
import contextlib
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

from bus.server import free_port, nats_server_binary
from schemas.codec import encode
from schemas.messages import Priority, Request, WorkBatch, WorkItem

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


async def denied(c: Checks, name: str, coro: Awaitable[object], errs: list[str]) -> None:
    """`coro` must fail, and the server must report a permissions violation meanwhile."""
    n = len(errs)
    try:
        await asyncio.wait_for(coro, 3)
        c.ok(name, False, "allowed")
    except Exception as exc:
        await asyncio.sleep(0.2)
        c.ok(name, any(VIOLATION in e for e in errs[n:]), repr(exc))


async def pub_denied(c: Checks, name: str, conn: Conn, subject: str) -> None:
    """A core publish to `subject` must be refused (the server says so; nothing raises)."""
    nc, errs = conn
    n = len(errs)
    await nc.publish(subject, b"forged")
    await nc.flush()
    await asyncio.sleep(0.2)
    c.ok(name, any(VIOLATION in e and subject.lower() in e for e in errs[n:]), str(errs[n:]))


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
    await asyncio.sleep(0.2)
    c.ok(name, any(VIOLATION in e and subject.lower() in e for e in errs[n:]), str(errs[n:]))
    with contextlib.suppress(Exception):
        await sub.unsubscribe()


async def until(cond: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    """Wait for `cond` (polled every 50 ms); its last value."""
    deadline = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return cond()
