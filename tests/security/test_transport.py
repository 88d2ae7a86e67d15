"""Transport security against a real nats-server: TLS (bus/tls.py certificates,
EmbeddedNats(tls=...)), credentials files (bus/credentials.py) and what the CLI
shows of a password (never: not in errors, not on a command line)."""

from __future__ import annotations

import json
import os
import secrets
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import nkeys
import pytest

from cplane.bus.credentials import connect_options
from cplane.bus.server import EmbeddedNats
from cplane.bus.tls import TlsFiles, make_certs
from cplane.schemas.settings import NatsSettings
from tests.waiting import until_sync

CPLANE = [sys.executable, "-m", "cplane.cli"]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_certs(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_server(certs: TlsFiles) -> Iterator[EmbeddedNats]:
    with EmbeddedNats(tls=certs) as server:
        yield server


async def _round_trip(nc: nats.NATS) -> None:
    sub = await nc.subscribe("sec.echo")
    await nc.flush()
    await nc.publish("sec.echo", b"over tls")
    msg = await sub.next_msg(timeout=5)
    assert msg.data == b"over tls"


async def _refused(url: str, **options: object) -> BaseException:
    with pytest.raises(Exception) as info:  # any failure to connect will do
        nc = await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0,
                                connect_timeout=2, **options)  # type: ignore[arg-type]
        await nc.close()
    return info.value


async def test_a_client_with_the_ca_talks_over_tls(tls_server: EmbeddedNats,
                                                   certs: TlsFiles) -> None:
    assert tls_server.url.startswith("tls://127.0.0.1:")
    opts = connect_options(NatsSettings(url=tls_server.url, tls_ca=certs.ca), env={})
    nc = await nats.connect(tls_server.url, **opts)  # type: ignore[arg-type]
    try:
        await _round_trip(nc)
    finally:
        await nc.close()
    # nats:// with the CA also upgrades, since the server requires TLS
    plain_url = f"nats://127.0.0.1:{tls_server.port}"
    nc = await nats.connect(plain_url, **connect_options(  # type: ignore[arg-type]
        NatsSettings(url=plain_url, tls_ca=certs.ca), env={}))
    try:
        await _round_trip(nc)
    finally:
        await nc.close()


async def test_plaintext_is_refused(tls_server: EmbeddedNats) -> None:
    """The server speaks TLS only: a plaintext CONNECT + PING gets no PONG."""
    with socket.create_connection(("127.0.0.1", tls_server.port), timeout=5) as s:
        info = s.recv(4096)
        assert info.startswith(b"INFO ") and json.loads(info[5:])["tls_required"] is True
        s.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n')
        got = b""
        try:
            while chunk := s.recv(4096):
                got += chunk
        except OSError:
            pass  # reset by the server
    assert b"PONG" not in got
    # and nats-py without our CA (the system's CAs) cannot verify the server
    err = await _refused(f"nats://127.0.0.1:{tls_server.port}")
    assert isinstance(err, ssl.SSLError | OSError | nats.errors.Error)


async def test_a_client_with_the_wrong_ca_is_refused(tls_server: EmbeddedNats,
                                                     tmp_path: Path) -> None:
    other = make_certs(tmp_path / "other")
    err = await _refused(tls_server.url, **connect_options(
        NatsSettings(url=tls_server.url, tls_ca=other.ca), env={}))
    assert isinstance(err, ssl.SSLCertVerificationError), repr(err)


async def test_verify_clients_wants_a_client_certificate(certs: TlsFiles) -> None:
    with EmbeddedNats(tls=certs, verify_clients=True) as server:
        await _refused(server.url, **connect_options(NatsSettings(url=server.url,
                                                                  tls_ca=certs.ca), env={}))
        opts = connect_options(NatsSettings(url=server.url, tls_ca=certs.ca,
                                            tls_cert=certs.client_cert,
                                            tls_key=certs.client_key), env={})
        nc = await nats.connect(server.url, **opts)  # type: ignore[arg-type]
        try:
            await _round_trip(nc)
        finally:
            await nc.close()


async def test_an_nkey_seed_file_authenticates(tmp_path: Path) -> None:
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    path = tmp_path / "user.nk"
    path.write_bytes(seed + b"\n")
    path.chmod(0o600)
    conf = "authorization { users = [ { nkey: %s } ] }" % public
    with EmbeddedNats(extra_config=conf) as server:
        await _refused(server.url)
        opts = connect_options(NatsSettings(creds=str(path)), env={})
        nc = await nats.connect(server.url, **opts)  # type: ignore[arg-type]
        try:
            await _round_trip(nc)
        finally:
            await nc.close()


# -- the CLI against a password-protected TLS server ---------------------------------
@dataclass
class Secured:
    url: str
    password: str
    creds: str  # JSON {"user", "password"}, 0600
    args: list[str]  # --nats-url, --creds, --tls-ca
    procs: list[subprocess.Popen[bytes]]


def _creds_file(path: Path, user: str, password: str) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"user": user, "password": password}, fh)
    return str(path)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, certs: TlsFiles) -> Iterator[Secured]:
    """nats-server (TLS, one user with a password), an orchestrator and a sim worker,
    each started with --creds and --tls-ca only."""
    tmp = tmp_path_factory.mktemp("secured")
    password = "pw-" + secrets.token_hex(12)
    conf = 'authorization { users = [ { user: cplane, password: "%s" } ] }' % password
    server = EmbeddedNats(tls=certs, extra_config=conf, max_file_store="64T").start()
    creds = _creds_file(tmp / "auth.json", "cplane", password)
    args = ["--nats-url", server.url, "--creds", creds, "--tls-ca", certs.ca]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "CPLANE"))}
    logs = [open(tmp / f"{name}.log", "wb") for name in ("orchestrator", "worker")]
    procs = [
        subprocess.Popen([*CPLANE, "orchestrator", *args], stdout=logs[0],
                         stderr=subprocess.STDOUT, env=env, cwd=ROOT),
        subprocess.Popen([*CPLANE, "worker", "--engine", "sim", "--zero-cost", "--model", "sim",
                          "--worker-id", "sec-0", *args], stdout=logs[1],
                         stderr=subprocess.STDOUT, env=env, cwd=ROOT),
    ]
    try:
        def one_worker() -> bool:
            for p, name in zip(procs, ("orchestrator", "worker"), strict=True):
                assert p.poll() is None, (tmp / f"{name}.log").read_text()[-2000:]
            res = subprocess.run([*CPLANE, "workers", "--json", "--wait", "1", *args],
                                 capture_output=True, text=True, timeout=30, env=env)
            return res.returncode == 0 and len(json.loads(res.stdout or "[]")) >= 1

        until_sync(one_worker, 60, "the worker's heartbeat, read with --creds over TLS")
        yield Secured(server.url, password, creds, args, procs)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for fh in logs:
            fh.close()
        server.stop()


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "CPLANE"))}


def test_generate_with_a_creds_file_over_tls(secured: Secured) -> None:
    res = subprocess.run([*CPLANE, "generate", "hello", "--max-tokens", "4", *secured.args],
                         capture_output=True, text=True, timeout=60, env=_clean_env())
    assert res.returncode == 0, res.stderr
    assert "length | 4 tokens" in res.stderr
    assert secured.password not in res.stdout + res.stderr


def test_a_wrong_password_fails_in_one_line_without_it(secured: Secured,
                                                       tmp_path: Path) -> None:
    wrong = "wrong-" + secrets.token_hex(8)
    bad = _creds_file(tmp_path / "bad.json", "cplane", wrong)
    args = [a if a != secured.creds else bad for a in secured.args]
    res = subprocess.run([*CPLANE, "generate", "hello", *args],
                         capture_output=True, text=True, timeout=60, env=_clean_env())
    err = res.stderr.strip()
    assert res.returncode != 0
    assert err.count("\n") == 0 and "cannot reach NATS" in err, err
    assert "authorization violation" in err.lower(), err
    assert wrong not in err and secured.password not in err
    # a password in the URL is shown as *** (and still refused)
    port = secured.url.rsplit(":", 1)[1]
    res = subprocess.run([*CPLANE, "generate", "hello", "--nats-url",
                          f"tls://cplane:{wrong}@127.0.0.1:{port}", "--tls-ca", args[-1]],
                         capture_output=True, text=True, timeout=60, env=_clean_env())
    err = res.stderr.strip()
    assert res.returncode != 0 and err.count("\n") == 0, err
    assert wrong not in err and "cplane:***@127.0.0.1" in err, err


def test_a_bad_creds_file_is_one_line(secured: Secured, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("password=" + secured.password)
    bad.chmod(0o600)
    args = [a if a != secured.creds else str(bad) for a in secured.args]
    res = subprocess.run([*CPLANE, "generate", "hello", *args],
                         capture_output=True, text=True, timeout=60, env=_clean_env())
    err = res.stderr.strip()
    assert res.returncode == 2 and err.count("\n") == 0, err
    assert str(bad) in err and secured.password not in err


def test_the_environment_carries_credentials(secured: Secured) -> None:
    env = {**_clean_env(), "NATS_USER": "cplane", "NATS_PASSWORD": secured.password}
    args = [a for a in secured.args if a not in ("--creds", secured.creds)]
    res = subprocess.run([*CPLANE, "workers", "--json", "--wait", "1", *args],
                         capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 0, res.stderr
    assert [w["worker_id"] for w in json.loads(res.stdout)] == ["sec-0"]


def test_no_password_on_a_command_line(secured: Secured) -> None:
    for p in secured.procs:
        cmdline = Path(f"/proc/{p.pid}/cmdline").read_bytes().decode()
        assert "--creds" in cmdline
        assert secured.password not in cmdline
