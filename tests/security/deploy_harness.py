"""The shipped NATS configuration and a fleet on it, for tests/security/test_deploy_config.py:
deploy/nats/single.conf with the committed accounts.conf, passwords from the server's
environment, real `cplane orchestrator` / `cplane worker` processes on their own
credentials, connections per principal, and the checks an attack is judged by
(`refused`, `pub_refused`, `still_serves`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from cplane.bus.credentials import connect_options
from cplane.bus.provision import store_configs, stream_configs
from cplane.bus.server import free_port, nats_server_binary
from cplane.client.sdk import Client
from cplane.schemas.codec import encode
from cplane.schemas.messages import Final, Request
from cplane.schemas.settings import NatsSettings, Settings, load_settings
from tests.waiting import quiet_for, subscribed, until, until_sync

ROOT = Path(__file__).resolve().parents[2]
NATS_DIR = ROOT / "deploy" / "nats"
CPLANE = [sys.executable, "-m", "cplane.cli"]
FLEET_WORKERS = ("w0", "w1")  # run by the fleet; an attacking worker is worker-w2
ATTACK = "attack-"  # the name of every connection whose violations are the point
QUIET_S = 0.5  # a forged message would reach the operator's `>` within milliseconds
VIOLATION = "permissions violation"

pytestmark = pytest.mark.timeout(600)


# -- the shipped server -------------------------------------------------------------------
@dataclass
class Deploy:
    url: str
    dir: Path
    passwords: dict[str, str]  # principal -> password
    creds: dict[str, str]  # principal -> 0600 JSON file, as `cplane up --auth` writes
    settings: Settings = field(default_factory=lambda: load_settings(env={}))

    @property
    def log(self) -> Path:
        return self.dir / "server.log"

    def legit_violations(self) -> list[str]:
        """Violations the server logged for connections that were not attacking."""
        return [ln for ln in self.log.read_text(errors="replace").splitlines()
                if "Violation" in ln and f':{ATTACK}' not in ln]


def shipped_principals() -> dict[str, str]:
    """user -> the environment variable holding its password, from the committed file."""
    text = (NATS_DIR / "accounts.conf").read_text()
    return dict(re.findall(r'user: "([^"]+)", password: \$(\w+)', text))


def _one(conf: str, pattern: str, line: str) -> str:
    new, n = re.subn(pattern, lambda _: line, conf, flags=re.M)
    assert n == 1, f"single.conf: expected one line matching {pattern!r}, found {n}"
    return new


def shipped_conf(tmp: Path, port: int) -> Path:
    """single.conf with its accounts include on; its client and monitoring ports (fixed
    in the file) moved to free ones, its store into `tmp`."""
    conf = (NATS_DIR / "single.conf").read_text()
    conf = _one(conf, r"^listen: .*$", f"listen: 127.0.0.1:{port}")
    conf = _one(conf, r"^#?\s*http: .*$", f"http: 127.0.0.1:{free_port()}")
    conf = _one(conf, r"^\s*store_dir: .*$", f'  store_dir: "{tmp / "js"}"')
    conf = _one(conf, r"^# include \./accounts\.conf$", "include ./accounts.conf")
    (tmp / "nats.conf").write_text(conf)
    shutil.copy(NATS_DIR / "accounts.conf", tmp / "accounts.conf")
    return tmp / "nats.conf"


def _write_creds(path: Path, data: dict[str, str]) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh)
    return str(path)


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "CPLANE"))}


@pytest.fixture(scope="module")
def deploy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deploy]:
    tmp = tmp_path_factory.mktemp("shipped-nats")
    port = free_port()
    conf = shipped_conf(tmp, port)
    users = shipped_principals()
    passwords = {u: "pw-" + uuid.uuid4().hex for u in users}
    env = {**_clean_env(), **{var: passwords[u] for u, var in users.items()}}
    creds = {}
    for u, pw in passwords.items():
        data = {"user": u, "password": pw}
        if not u.startswith(("tenant-", "operator")):  # system processes: own inboxes
            data["inbox_prefix"] = f"_INBOX_{u}"
        creds[u] = _write_creds(tmp / f"{u}.json", data)
    with open(tmp / "server.log", "wb") as log:
        proc = subprocess.Popen([nats_server_binary(), "-c", str(conf)], stdout=log,
                                stderr=subprocess.STDOUT, env=env)
    try:
        def listening() -> bool:
            assert proc.poll() is None, (tmp / "server.log").read_text()[-3000:]
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return True
            except OSError:
                return False

        until_sync(listening, 20, "the shipped nats-server to listen")
        yield Deploy(f"nats://127.0.0.1:{port}", tmp, passwords, creds)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- connections --------------------------------------------------------------------------
@dataclass
class Conn:
    nc: NATS
    errors: list[str]

    def violated(self, since: int, subject: str = "") -> bool:
        return any(VIOLATION in e and subject.lower() in e for e in self.errors[since:])


Connect = Callable[..., Awaitable[Conn]]


@pytest.fixture
async def connect(deploy: Deploy) -> AsyncIterator[Connect]:
    """`await connect(principal, attack=False)`: a connection as that principal (its
    credentials file: user, password, inbox prefix), closed after the test."""
    made: list[NATS] = []

    async def open_(principal: str, *, attack: bool = False) -> Conn:
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc).lower())

        opts = connect_options(NatsSettings(url=deploy.url, creds=deploy.creds[principal]),
                               env={})
        name = f"{ATTACK if attack else 'legit-'}{principal}-{uuid.uuid4().hex[:6]}"
        nc = await nats.connect(deploy.url, name=name, error_cb=on_error,
                                max_reconnect_attempts=0, **opts)
        made.append(nc)
        return Conn(nc, errors)

    yield open_
    for nc in made:
        with contextlib.suppress(Exception):
            await nc.close()


# -- the fleet ----------------------------------------------------------------------------
# The prefix router, so that workers' KV events (llm.kv.<id>) and snapshot requests
# (llm.admin.kv.<id>) flow too, with blocks small enough for short prompts.
FLEET_ENV = {"CPLANE__ORCHESTRATOR__ROUTER": "prefix_aware",
             "CPLANE__ORCHESTRATOR__PREFIX_BLOCK_TOKENS": "4",
             "CPLANE__SIM__PREFIX_BLOCK_TOKENS": "4"}


async def _nats_as(deploy: Deploy, principal: str, name: str) -> NATS:
    """A plain connection as `principal` (outside a test's `connect`)."""
    opts = connect_options(NatsSettings(creds=deploy.creds[principal]), env={})
    return await nats.connect(deploy.url, name=name, **opts)


@dataclass
class Fleet:
    deploy: Deploy
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: list[IO[bytes]] = field(default_factory=list)

    def start(self, user: str, *cmd: str) -> None:
        self.logs.append(open(self.deploy.dir / f"{user}.log", "wb"))
        self.procs[user] = subprocess.Popen(
            [*CPLANE, *cmd, "--nats-url", self.deploy.url, "--creds", self.deploy.creds[user]],
            stdout=self.logs[-1], stderr=subprocess.STDOUT, env={**_clean_env(), **FLEET_ENV},
            cwd=ROOT)

    def alive(self) -> bool:
        """False while every process runs (it fails the test with the log of one that died)."""
        for user, p in self.procs.items():
            assert p.poll() is None, (self.deploy.dir / f"{user}.log").read_text()[-3000:]
        return False

    async def provisioned(self, op: NATS) -> bool:
        self.alive()
        want = {c.name for c in stream_configs(self.deploy.settings)}
        want |= {c.name for c in store_configs(self.deploy.settings).values()}
        return want <= {si.config.name for si in await op.jetstream().streams_info()}

    async def serves(self, tenant: NATS) -> bool:
        self.alive()
        with contextlib.suppress(Exception):
            await _generate(Client(tenant, self.deploy.settings, tenant_view=True), 5)
            return True
        return False

    def stop(self) -> None:
        for p in self.procs.values():
            p.terminate()
        for p in self.procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for fh in self.logs:
            fh.close()


@pytest.fixture(scope="module")
async def fleet(deploy: Deploy) -> AsyncIterator[Fleet]:
    """`cplane orchestrator` and two sim workers, each with --creds of its own user.

    The orchestrator first: it provisions every stream and store. A worker started
    before it would try to create them itself (bus/streams_ready.py), which this
    configuration refuses, by design, with a violation in the log."""
    f = Fleet(deploy)
    try:
        f.start("orchestrator", "orchestrator")
        op = await _nats_as(deploy, "operator", "legit-operator-fleet")
        tenant = await _nats_as(deploy, "tenant-b", "legit-tenant-b-fleet")
        try:
            await until(lambda: f.provisioned(op), 60, "the orchestrator to provision")
            beats: set[str] = set()

            async def on_hb(msg: Msg) -> None:
                beats.add(msg.subject)

            await op.subscribe(deploy.settings.subjects.heartbeats_all, cb=on_hb)
            for w in FLEET_WORKERS:
                f.start(f"worker-{w}", "worker", "--engine", "sim", "--zero-cost", "--model",
                        "sim", "--worker-id", w)
            want = {deploy.settings.subjects.heartbeat(w) for w in FLEET_WORKERS}
            await until(lambda: f.alive() or want <= beats, 60, "both workers' heartbeats")
            await until(lambda: f.serves(tenant), 60, "the fleet to serve tenant b")
        finally:
            await tenant.close()
            await op.close()
        yield f
    finally:
        f.stop()


def _request(rid: str | None = None, **kw: Any) -> Request:
    fields: dict[str, object] = {"prompt": "hello there", "max_tokens": 4, **kw}
    return Request(request_id=rid or f"r{uuid.uuid4().hex[:12]}", **fields)  # type: ignore[arg-type]


async def _generate(client: Client, timeout: float = 30, **kw: Any) -> Final:
    final = await client.generate(_request(**kw), timeout=timeout)
    assert final.finish_reason is not None and final.chunks > 0, repr(final)
    return final


async def still_serves(deploy: Deploy, connect: Connect, tenant: str = "b") -> None:
    """The fleet serves `tenant` (not the attacker), and nobody legitimate was refused."""
    conn = await connect(f"tenant-{tenant}")
    await _generate(Client(conn.nc, deploy.settings, tenant_view=True))
    assert not conn.errors, conn.errors
    assert not deploy.legit_violations(), deploy.legit_violations()


async def _gateway_request(deploy: Deploy, gw: Conn, tenant: str) -> str:
    """The gateway publishes a request for `tenant` itself and reads its terminal live
    on the literal subject `llm.done.<tenant>.i.<id>`."""
    s = deploy.settings.subjects
    rid = f"gw{uuid.uuid4().hex[:10]}"
    done: list[Msg] = []

    async def on_done(msg: Msg) -> None:
        done.append(msg)

    await gw.nc.subscribe(s.done(f"{tenant}.i", rid), cb=on_done)
    await subscribed(gw.nc)
    ack = await gw.nc.jetstream().publish(s.request("normal", "standard", tenant),
                                          encode(_request(rid)), timeout=5)
    assert ack.stream == deploy.settings.streams.req.name
    await until(lambda: done, 30, f"the gateway's request {rid} for {tenant}")
    return rid


@dataclass
class Witness:
    """The operator's `>` in the system account: whatever carries `marker` arrived."""
    marker: bytes
    seen: list[str] = field(default_factory=list)

    async def on_msg(self, msg: Msg) -> None:
        if self.marker in msg.data:
            self.seen.append(msg.subject)


@pytest.fixture
async def witness(connect: Connect) -> Witness:
    w = Witness(f"forged-{uuid.uuid4().hex}".encode())
    op = await connect("operator")
    await op.nc.subscribe(">", cb=w.on_msg)
    await subscribed(op.nc)
    return w


async def refused(conn: Conn, call: Awaitable[object], subject: str = "") -> None:
    """`call` does not succeed, and the server reports a permissions violation for it.

    A denied request gets no answer (nats-py would wait out its timeout), so the check
    ends at the violation the server sends at once; the call is then cancelled."""
    n = len(conn.errors)
    task = asyncio.ensure_future(call)
    await until(lambda: task.done() or conn.violated(n, subject), 10,
                "the call to fail or be refused")
    if task.done():
        assert task.cancelled() or task.exception() is not None, f"allowed: {task.result()!r}"
        await until(lambda: conn.violated(n, subject), 5, f"a violation ({conn.errors[n:]})")
    else:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


async def pub_refused(conn: Conn, subject: str, witness: Witness) -> None:
    """A core publish: refused by the server, and nothing reaches the system account."""
    n = len(conn.errors)
    await conn.nc.publish(subject, witness.marker)
    await conn.nc.flush()
    await until(lambda: conn.violated(n, subject), 5, f"a violation for {subject}")
    await quiet_for(QUIET_S, lambda: witness.seen,
                    why=f"a forged {subject} would reach the operator's `>` at once")
