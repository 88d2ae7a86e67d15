"""Hostile clients against `cplane gateway` (a process, on a real nats-server with an
orchestrator and a sim worker): each attack is refused, and a well-behaved client is
served right after it.

Raw sockets where the attack lives below HTTP libraries (half a request line, a body
that trickles, a 64 MiB Content-Length); httpx for the rest. Socket work runs in
threads: the orchestrator and worker share this event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import select
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import msgspec
import psutil
import pytest

from cplane.schemas.settings import Settings
from tests.natsfix import isolated_settings
from tests.stack import stack
from tests.waiting import until

MiB = 1 << 20
HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.0
MAX_BODY = 64 << 10
MAX_FILE = 1 * MiB
KEYS = {"ka": "tenant-a", "kb": "tenant-b", "kc": "tenant-c"}
CHAT = [{"role": "user", "content": "hello"}]
GATEWAY_TOML = f"""
[gateway]
api_keys = {{ ka = "tenant-a", kb = "tenant-b", kc = "tenant-c" }}
max_body_bytes = {MAX_BODY}
max_file_bytes = {MAX_FILE}
header_timeout_s = {HEADER_TIMEOUT_S}
body_timeout_s = {BODY_TIMEOUT_S}
upload_timeout_s = 5.0
max_streams = 4
max_streams_per_key = 2
metrics_require_key = true

[gateway.api_key_policies.kp]
tenant = "tenant-p"
max_priority = "normal"
max_in_flight = 1

[gateway.api_key_policies.kr]
tenant = "tenant-r"
max_rps = 0.2
"""


def _auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def _env(s: Settings) -> dict[str, str]:
    """The gateway process sees the test's private prefix and stream names."""
    env = dict(os.environ, CPLANE__NATS__PREFIX=s.nats.prefix, CPLANE_LOG_LEVEL="WARNING")
    for key, cfg in msgspec.to_builtins(s.streams).items():
        if isinstance(cfg, dict) and "name" in cfg:
            env[f"CPLANE__STREAMS__{key.upper()}__NAME"] = cfg["name"]
    return env


@dataclass(frozen=True)
class Gw:
    url: str
    proc: psutil.Process

    @property
    def addr(self) -> tuple[str, int]:
        u = urlsplit(self.url)
        return u.hostname or "127.0.0.1", u.port or 80


@contextlib.asynccontextmanager
async def _gateway(s: Settings, toml: str, tmp: Path, probe: str, key: str,
                   ready: str) -> AsyncIterator[Gw]:
    """`cplane gateway --config` on a free port; yields once GET `probe` (with `key`)
    answers 200 with `ready` in its body."""
    cfg = tmp / "gateway.toml"
    cfg.write_text(toml)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cplane.cli", "gateway", "--nats-url", s.nats.url, "--port", "0",
        "--config", str(cfg), stdout=asyncio.subprocess.PIPE, env=_env(s))
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        assert line.startswith("gateway: http://"), line
        url = line.split()[1]
        async with httpx.AsyncClient(base_url=url, headers=_auth(key)) as http:
            async def up() -> bool:
                with contextlib.suppress(httpx.HTTPError):
                    r = await http.get(probe)
                    return r.status_code == 200 and ready in r.text
                return False

            await until(up, 30, f"the gateway's {probe}")
        yield Gw(url, psutil.Process(proc.pid))
    finally:
        if proc.returncode is None:
            proc.terminate()
        rc = await asyncio.wait_for(proc.wait(), 30)
    assert rc == 0, f"the gateway exited with {rc}"


@pytest.fixture(scope="module")
async def gw(nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gw]:
    s = isolated_settings(nats_url)
    async with stack(s, workers=1), _gateway(
            s, GATEWAY_TOML, tmp_path_factory.mktemp("gw"), "/health", "ka", '"sim"') as g:
        yield g


async def _served(g: Gw, key: str = "ka") -> None:
    """A well-behaved client gets its completion."""
    async with httpx.AsyncClient(base_url=g.url, timeout=30) as http:
        r = await http.post("/v1/chat/completions", headers=_auth(key),
                            json={"model": "sim", "messages": CHAT, "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3


def _api_error(r: httpx.Response, status: int) -> dict[str, object]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    return err


async def _released(g: Gw) -> None:
    """Wait until the gateway holds no request open (held streams let go)."""
    async def none_open() -> bool:
        async with httpx.AsyncClient(base_url=g.url) as http:
            text = (await http.get("/metrics", headers=_auth("ka"))).text
        m = re.search(r"^cplane_gateway_open_requests (\S+)$", text, re.M)
        assert m, text
        return float(m.group(1)) == 0

    await until(none_open, 15, "the held streams to be released")


# -- raw sockets ----------------------------------------------------------------------
@dataclass
class Pushed:
    answer: bytes  # what came back (the status line and headers at least, when any)
    sent: int  # body bytes the server had taken when the answer came
    closed: bool  # the server closed the connection after answering
    seconds: float  # from the headers sent to the answer (or the close)

    @property
    def status(self) -> int:
        m = re.match(rb"HTTP/1\.1 (\d{3}) ", self.answer)
        return int(m.group(1)) if m else 0

    def json(self) -> dict[str, object]:
        return json.loads(self.answer.partition(b"\r\n\r\n")[2])


def _read_answer(s: socket.socket, deadline: float) -> tuple[bytes, bool]:
    """Read until the server closes (True) or `deadline` passes (False)."""
    got = b""
    while time.monotonic() < deadline:
        r, _, _ = select.select([s], [], [], max(0.0, deadline - time.monotonic()))
        if not r:
            break
        try:
            data = s.recv(65536)
        except ConnectionResetError:
            return got, True
        if not data:
            return got, True
        got += data
    return got, False


def _push(addr: tuple[str, int], head: bytes, body: Iterable[bytes], *, pause_s: float = 0.0,
          limit_s: float = 10.0) -> Pushed:
    """Send `head`, then `body` piece by piece (each after `pause_s`) while watching for
    an answer; stop sending as soon as one comes, then read to the close."""
    with socket.create_connection(addr, timeout=limit_s) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
        s.sendall(head)
        t0 = time.monotonic()
        deadline = t0 + limit_s
        s.setblocking(False)
        sent = 0
        for piece in body:
            view = memoryview(piece)
            answered = False
            while view and not answered:
                r, w, _ = select.select([s], [s], [], max(0.0, deadline - time.monotonic()))
                if r:
                    answered = True
                elif w:
                    try:
                        n = s.send(view)
                    except (BrokenPipeError, ConnectionResetError):
                        answered = True
                        break
                    view = view[n:]
                    sent += n
                else:
                    raise AssertionError(f"no answer and no progress in {limit_s} s")
            if answered:
                break
            if pause_s:
                r, _, _ = select.select([s], [], [], pause_s)  # pacing: the slow client
                if r:
                    break
        answer, closed = _read_answer(s, deadline)
        return Pushed(answer, sent, closed, time.monotonic() - t0)


def _head(method: str, path: str, key: str, extra: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "host: gw", f"authorization: Bearer {key}",
             *(f"{k}: {v}" for k, v in extra.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _pieces(total: int, size: int = 64 << 10) -> Iterator[bytes]:
    block = b"x" * size
    for _ in range(total // size):
        yield block


def _chunked(pieces: Iterable[bytes]) -> Iterator[bytes]:
    for p in pieces:
        yield b"%x\r\n" % len(p) + p + b"\r\n"


_BOUNDARY = "cplaneboundary"
_FORM_HEAD = (f"--{_BOUNDARY}\r\ncontent-disposition: form-data; name=\"purpose\"\r\n\r\n"
              f"batch\r\n--{_BOUNDARY}\r\ncontent-disposition: form-data; name=\"file\"; "
              f"filename=\"big.jsonl\"\r\ncontent-type: application/octet-stream\r\n\r\n").encode()


def _rss_mib(g: Gw) -> float:
    return g.proc.memory_info().rss / MiB


# -- 1. ownership ---------------------------------------------------------------------
async def test_another_tenants_files_and_batches_are_404_like_missing_ones(gw: Gw) -> None:
    line = {"custom_id": "q0", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "sim", "messages": CHAT, "max_tokens": 2000}}
    data = (json.dumps(line) + "\n").encode()
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        r = await http.post("/v1/files", headers=_auth("kb"), data={"purpose": "batch"},
                            files={"file": ("b.jsonl", data)})
        assert r.status_code == 200, r.text
        fid = r.json()["id"]
        r = await http.post("/v1/batches", headers=_auth("kb"), json={
            "input_file_id": fid, "endpoint": "/v1/chat/completions", "completion_window": "24h"})
        assert r.status_code == 200, r.text
        bid = r.json()["id"]
        missing_f, missing_b = "file-" + "0" * 32, "batch_" + "0" * 32

        async def same_as_missing(method: str, path: str, real: str, fake: str) -> None:
            theirs = await http.request(method, path.format(real), headers=_auth("ka"))
            none = await http.request(method, path.format(fake), headers=_auth("ka"))
            assert theirs.status_code == none.status_code == 404, (path, theirs.text)
            assert theirs.text.replace(real, "ID") == none.text.replace(fake, "ID"), path

        await same_as_missing("GET", "/v1/files/{}", fid, missing_f)
        await same_as_missing("GET", "/v1/files/{}/content", fid, missing_f)
        await same_as_missing("DELETE", "/v1/files/{}", fid, missing_f)
        await same_as_missing("GET", "/v1/batches/{}", bid, missing_b)
        await same_as_missing("POST", "/v1/batches/{}/cancel", bid, missing_b)
        r = await http.post("/v1/batches", headers=_auth("ka"), json={
            "input_file_id": fid, "endpoint": "/v1/chat/completions", "completion_window": "24h"})
        _api_error(r, 404)
        listed = (await http.get("/v1/files", headers=_auth("ka"))).json()["data"]
        assert fid not in [f["id"] for f in listed]
        listed = (await http.get("/v1/batches", headers=_auth("ka"))).json()["data"]
        assert bid not in [b["id"] for b in listed]
        # The owner still has it all, untouched by the attempts.
        assert fid in [f["id"] for f in (await http.get("/v1/files", headers=_auth("kb"))
                                         ).json()["data"]]
        r = await http.get(f"/v1/files/{fid}/content", headers=_auth("kb"))
        assert r.status_code == 200 and r.content == data
        assert r.headers["content-length"] == str(len(data))
        r = await http.get(f"/v1/batches/{bid}", headers=_auth("kb"))
        assert r.status_code == 200 and r.json()["status"] not in ("cancelling", "cancelled")
        assert bid in [b["id"] for b in (await http.get("/v1/batches", headers=_auth("kb"))
                                         ).json()["data"]]
        r = await http.post(f"/v1/batches/{bid}/cancel", headers=_auth("kb"))
        assert r.status_code == 200, r.text
        r = await http.delete(f"/v1/files/{fid}", headers=_auth("kb"))
        assert r.status_code == 200 and r.json()["deleted"] is True
        assert (await http.get(f"/v1/files/{fid}", headers=_auth("kb"))).status_code == 404
    await _served(gw)


# -- 2. bodies ------------------------------------------------------------------------
async def test_declared_64_mib_upload_is_refused_before_its_body(gw: Gw) -> None:
    rss0 = _rss_mib(gw)
    head = _head("POST", "/v1/files", "ka", {
        "content-type": f"multipart/form-data; boundary={_BOUNDARY}",
        "content-length": str(64 * MiB)})
    p = await asyncio.to_thread(_push, gw.addr, head, _pieces(64 * MiB))
    assert p.status == 413, p.answer[:300]
    assert p.json()["error"]["code"] == "too_large"  # type: ignore[index]
    assert p.sent < 4 * MiB, p.sent
    assert p.closed
    # A /v1/batches body declared at 128 MiB: the same, against max_body_bytes.
    head = _head("POST", "/v1/batches", "ka", {"content-type": "application/json",
                                               "content-length": str(128 * MiB)})
    p2 = await asyncio.to_thread(_push, gw.addr, head, _pieces(128 * MiB))
    assert p2.status == 413 and p2.sent < 4 * MiB and p2.closed, (p2.status, p2.sent)
    grew = _rss_mib(gw) - rss0
    print(f"\ndeclared 64 MiB upload: 413 after {p.sent / MiB:.2f} MiB sent, "
          f"{p.seconds * 1000:.1f} ms; 128 MiB /v1/batches: after {p2.sent / MiB:.2f} MiB; "
          f"gateway RSS {rss0:.1f} -> {rss0 + grew:.1f} MiB")
    assert grew < 16, grew
    await _served(gw)


async def test_chunked_upload_and_json_bodies_are_cut_at_the_limit(gw: Gw) -> None:
    rss0 = _rss_mib(gw)
    head = _head("POST", "/v1/files", "ka", {
        "content-type": f"multipart/form-data; boundary={_BOUNDARY}",
        "transfer-encoding": "chunked"})
    body = _chunked([_FORM_HEAD, *_pieces(64 * MiB)])
    p = await asyncio.to_thread(_push, gw.addr, head, body)
    assert p.status == 413 and p.closed, p.answer[:300]
    assert MAX_FILE <= p.sent < 8 * MiB, p.sent
    # JSON endpoints: /v1/batches and a completion, chunked past max_body_bytes.
    for path in ("/v1/batches", "/v1/chat/completions"):
        head = _head("POST", path, "ka", {"content-type": "application/json",
                                          "transfer-encoding": "chunked"})
        q = await asyncio.to_thread(_push, gw.addr, head, _chunked(_pieces(64 * MiB)))
        assert q.status == 413 and q.closed and q.sent < 8 * MiB, (path, q.status, q.sent)
    # A file just over the limit, sent plainly, is 413 too; one under it is stored.
    async with httpx.AsyncClient(base_url=gw.url, timeout=30, headers=_auth("ka")) as http:
        r = await http.post("/v1/files", data={"purpose": "batch"},
                            files={"file": ("x.jsonl", b"x" * (MAX_FILE + 1))})
        _api_error(r, 413)
        r = await http.post("/v1/files", data={"purpose": "batch"},
                            files={"file": ("x.jsonl", b"y" * MAX_FILE)})
        assert r.status_code == 200 and r.json()["bytes"] == MAX_FILE, r.text
        got = await http.get(f"/v1/files/{r.json()['id']}/content")
        assert got.content == b"y" * MAX_FILE
    print(f"\nchunked 64 MiB upload: 413 after {p.sent / MiB:.2f} MiB sent, "
          f"{p.seconds * 1000:.1f} ms; gateway RSS {rss0:.1f} -> {_rss_mib(gw):.1f} MiB")
    assert _rss_mib(gw) - rss0 < 32
    await _served(gw)


async def test_a_body_slower_than_its_timeout_gets_408(gw: Gw) -> None:
    head = _head("POST", "/v1/chat/completions", "ka", {"content-type": "application/json",
                                                        "content-length": "400"})
    p = await asyncio.to_thread(_push, gw.addr, head, (b" " for _ in range(400)), pause_s=0.1)
    assert p.status == 408 and p.closed, p.answer[:300]
    assert p.json()["error"]["code"] == "request_timeout"  # type: ignore[index]
    assert BODY_TIMEOUT_S - 0.1 <= p.seconds < BODY_TIMEOUT_S + 3, p.seconds
    # A body no handler reads (GET /v1/models answers without it): the answer, then
    # the connection closes, instead of reading the trickle for as long as it lasts.
    head = _head("GET", "/v1/models", "ka", {"content-length": "400"})
    p = await asyncio.to_thread(_push, gw.addr, head, (b" " for _ in range(400)), pause_s=0.1)
    assert p.status == 200 and p.closed and p.seconds < 3, (p.status, p.seconds)
    await _served(gw)


# -- 4. headers -----------------------------------------------------------------------
async def test_half_a_request_line_is_closed_after_the_header_timeout(gw: Gw) -> None:
    def half(first: bytes, trickle: bytes) -> Pushed:
        # Half a request line, then (trickle) one more byte every 0.2 s: the deadline
        # is the headers' whole, not a gap between bytes.
        return _push(gw.addr, first, (bytes([b]) for b in trickle), pause_s=0.2)

    for first, trickle in ((b"GET /v1/mod", b""), (b"", b""),
                           (b"GET /v1/models HTTP/1.1\r\nhost: gw\r\n", b"x-slow: " + b"a" * 60)):
        p = await asyncio.to_thread(half, first, trickle)
        assert p.closed, (first, p)
        assert HEADER_TIMEOUT_S - 0.1 <= p.seconds < HEADER_TIMEOUT_S + 2, (first, p.seconds)
        assert p.answer in (b"",) or p.status == 408, p.answer
    huge = _head("GET", "/v1/models", "ka", {"x-junk": "a" * (100 << 10)})
    p = await asyncio.to_thread(_push, gw.addr, huge, [])
    assert p.status == 431 and p.closed, p.answer[:200]
    await _served(gw)


# -- 3 + 6. open requests, rate, priority ceiling -------------------------------------
async def test_open_streams_are_capped_per_key_and_overall(gw: Gw) -> None:
    body = {"model": "sim", "messages": CHAT, "max_tokens": 3000, "stream": True}
    async with contextlib.AsyncExitStack() as held, httpx.AsyncClient(
            base_url=gw.url, timeout=30) as http:
        async def hold(key: str) -> None:
            r = await held.enter_async_context(http.stream(
                "POST", "/v1/chat/completions", json=body, headers=_auth(key)))
            assert r.status_code == 200

        async def refused(key: str, code: str) -> str:
            r = await http.post("/v1/chat/completions", json=body, headers=_auth(key))
            err = _api_error(r, 429)
            assert err["code"] == code and int(r.headers["retry-after"]) >= 1
            return str(err["message"])

        await hold("ka")
        await hold("ka")
        assert "API key" in await refused("ka", "too_many_streams")
        await hold("kb")
        await hold("kb")  # 4 open: the gateway's cap
        assert "gateway" in await refused("kc", "too_many_streams")
    await _released(gw)
    # kp may hold one at a time.
    async with contextlib.AsyncExitStack() as held, httpx.AsyncClient(
            base_url=gw.url, timeout=30) as http:
        r = await held.enter_async_context(http.stream(
            "POST", "/v1/chat/completions", json=body, headers=_auth("kp")))
        assert r.status_code == 200
        r2 = await http.post("/v1/chat/completions", json=body, headers=_auth("kp"))
        assert _api_error(r2, 429)["code"] == "too_many_streams"
    await _released(gw)
    await _served(gw, "kp")
    await _served(gw)


async def test_rate_and_priority_ceiling_per_key(gw: Gw) -> None:
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        assert (await http.get("/v1/models", headers=_auth("kr"))).status_code == 200
        r = await http.get("/v1/models", headers=_auth("kr"))  # 0.2/s: the next in 5 s
        err = _api_error(r, 429)
        assert err["code"] == "rate_limited" and 1 <= int(r.headers["retry-after"]) <= 5
        chat = {"model": "sim", "messages": CHAT, "max_tokens": 2}
        asks: list[tuple[dict[str, str], dict[str, object]]] = [
            ({"x-priority": "high"}, {}), ({}, {"priority": -2}),
            ({"x-priority": "critical"}, {"priority": "low"})]  # the header wins
        for headers, extra in asks:
            r = await http.post("/v1/chat/completions", json={**chat, **extra},
                                headers={**_auth("kp"), **headers})
            err = _api_error(r, 403)
            assert err["param"] == "priority" and "'normal'" in str(err["message"])
        for prio in ("normal", "low", "background"):
            r = await http.post("/v1/chat/completions", json=chat,
                                headers={**_auth("kp"), "x-priority": prio})
            assert r.status_code == 200, r.text
    await _served(gw)


# -- 5. priority and SLO class parsing -------------------------------------------------
async def test_hostile_priority_and_slo_class_are_one_clear_400(gw: Gw) -> None:
    chat = {"model": "sim", "messages": CHAT, "max_tokens": 2}
    bad_headers: list[tuple[bytes, bytes]] = [
        (b"x-priority", b"--5"), (b"x-priority", b"5" * 5000), (b"x-priority", b"1e9"),
        (b"x-priority", b"urgent"), (b"x-slo-class", "inter\u202eactive".encode()),
        (b"x-slo-class", b"a" * 65), (b"x-slo-class", b"a.b"), (b"x-slo-class", b"a b")]
    bad_bodies: list[dict[str, object]] = [
        {"slo_class": "a\u0000b"}, {"slo_class": "inter\u202eactive"}, {"priority": "--5"},
        {"priority": "5" * 5000}]
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        for h in bad_headers:
            r = await http.post("/v1/chat/completions", json=chat,
                                headers=[(b"authorization", b"Bearer ka"), h])
            err = _api_error(r, 400)
            assert err["type"] == "invalid_request_error", (h, err)
            assert err["param"] in ("priority", "slo_class"), (h, err)
            assert len(r.content) < 1000
        for b in bad_bodies:
            r = await http.post("/v1/chat/completions", json={**chat, **b}, headers=_auth("ka"))
            err = _api_error(r, 400)
            assert err["type"] == "invalid_request_error" and err["param"] in (
                "priority", "slo_class"), (b, err)
        r = await http.post("/v1/chat/completions", json=chat,
                            headers={**_auth("ka"), "x-priority": "-1", "x-slo-class": "batch"})
        assert r.status_code == 200, r.text
    await _served(gw)


# -- 7. exposure ----------------------------------------------------------------------
async def test_metrics_and_health_exposure(gw: Gw, nats_url: str, tmp_path: Path) -> None:
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        _api_error(await http.get("/metrics"), 401)
        _api_error(await http.get("/metrics", headers=_auth("nope")), 401)
        r = await http.get("/metrics", headers=_auth("kb"))
        assert r.status_code == 200 and "cplane_gateway_open_requests" in r.text
        assert (await http.get("/health")).status_code == 200  # probes need no key
    s = isolated_settings(nats_url)
    toml = ('[gateway]\napi_keys = { k = "t" }\nexpose_health = false\n'
            'expose_metrics = false\n')
    async with _gateway(s, toml, tmp_path, "/v1/models", "k", '"list"') as hidden, \
            httpx.AsyncClient(base_url=hidden.url, timeout=30) as http:
        for path in ("/health", "/metrics"):
            for headers in ({}, _auth("k")):
                _api_error(await http.get(path, headers=headers), 404)
    await _served(gw)
