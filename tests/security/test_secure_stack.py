"""`cplane up --auth --tls` end to end: TLS-only NATS, an https gateway, credentials
files only their owner reads, and a tenant served over both."""

from __future__ import annotations

import os
import ssl
import stat
from collections.abc import Iterator

import httpx
import nats
import pytest

from cplane.client import Client
from cplane.schemas.messages import Request
from cplane.schemas.settings import load_settings
from cplane.stack import Stack, StackSpec


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    s = Stack(StackSpec(workers=1, auth=True, tenants=["a"], tls=True))
    s.bind_gateway()
    s.start(timeout_s=120)
    try:
        yield s
    finally:
        s.stop()


def test_every_principals_credentials_are_its_owners_alone(stack: Stack) -> None:
    assert stack.auth is not None
    assert stat.S_IMODE(os.stat(stack.auth.directory).st_mode) == 0o700
    for path in stack.auth.files.values():
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path


async def test_nats_is_tls_only_and_a_tenant_is_served_over_it(stack: Stack) -> None:
    assert stack.auth is not None and stack.tls_ca is not None
    assert stack.url.startswith("tls://")
    with pytest.raises(Exception):  # noqa: B017 - a plain client is refused, however it fails
        nc = await nats.connect(stack.url.replace("tls://", "nats://"), allow_reconnect=False,
                                max_reconnect_attempts=0, connect_timeout=2)
        await nc.close()
    settings = load_settings(env={}, nats={"url": stack.url, "creds": stack.auth.creds("tenant-a"),
                                           "tls_ca": stack.tls_ca})
    async with await Client.connect(settings=settings) as client:
        assert client.tenant_view
        final = await client.generate(Request(request_id="tls-1", prompt="hi", max_tokens=3),
                                      timeout=30)
        assert final.usage.completion_tokens == 3


async def test_the_gateway_serves_https_to_a_tenants_key(stack: Stack) -> None:
    assert stack.auth is not None and stack.tls_ca and stack.gateway_url
    assert stack.gateway_url.startswith("https://")
    key = next(k for k, t in stack.auth.api_keys.items() if t == "a")
    verify = ssl.create_default_context(cafile=stack.tls_ca)
    async with httpx.AsyncClient(base_url=stack.gateway_url, verify=verify, timeout=30) as http:
        got = await http.post("/v1/completions", json={"model": "sim", "prompt": "hi",
                                                       "max_tokens": 2},
                              headers={"Authorization": f"Bearer {key}"})
        assert got.status_code == 200, got.text
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=5) as untrusting:
        with pytest.raises(httpx.ConnectError):  # the throwaway CA is not the system's
            await untrusting.get("/health")
