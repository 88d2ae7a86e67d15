"""The CLI as users run it: `cplane up`, `cplane generate`, `cplane schema`."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.waiting import until_up

CPLANE = [sys.executable, "-m", "cplane.cli"]
ROOT = Path(__file__).resolve().parents[2]


def test_schema_prints_every_wire_type() -> None:
    out = subprocess.run([*CPLANE, "schema"], capture_output=True, text=True, check=True).stdout
    schemas = json.loads(out)
    assert {"Request", "WorkBatch", "TokenChunk", "Final", "ErrorReply", "Heartbeat"} <= set(schemas)


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("up") / "up.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([*CPLANE, "up"], stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        yield until_up(proc, log)
    finally:
        proc.terminate()
        proc.wait(60)
    assert proc.returncode == 0, log.read_text()[-2000:]


def test_up_then_generate_streams_text(up: str) -> None:
    res = subprocess.run([*CPLANE, "generate", "hello world", "--max-tokens", "16",
                          "--nats-url", up, "--priority", "high"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.split()) == 16
    assert "length | 16 tokens" in res.stderr


def test_generate_json_and_env_url(up: str) -> None:
    import os

    env = dict(os.environ, NATS_URL=up)
    res = subprocess.run([*CPLANE, "generate", "hi", "--max-tokens", "3", "--json"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 0, res.stderr
    final = json.loads(res.stdout.strip().splitlines()[-1])
    assert final["type"] == "final" and final["usage"]["completion_tokens"] == 3


def test_client_errors_are_one_line(up: str) -> None:
    res = subprocess.run([*CPLANE, "generate", "hi", "--slo-class", "a.b", "--nats-url", up],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert res.stderr.strip().count("\n") == 0 and "slo_class 'a.b' is not a subject token" in res.stderr
    res = subprocess.run([*CPLANE, "generate", "hi", "--nats-url", "nats://127.0.0.1:1"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "Traceback" not in res.stderr


async def test_a_service_freezes_its_heap_once_ready() -> None:
    """Full collections then skip what existed at start (40-60 ms pauses otherwise),
    and the young generation is collected less often (CPU per request)."""
    import gc

    from cplane.service_run import YOUNG_GC_THRESHOLD, freeze_heap_when

    gc.unfreeze()
    threshold = gc.get_threshold()
    ready = asyncio.Event()
    task = asyncio.create_task(freeze_heap_when(ready))
    await asyncio.sleep(0)  # one loop turn, no wait: the task runs up to its wait on ready
    assert gc.get_freeze_count() == 0 and not task.done()  # nothing before ready
    ready.set()
    await asyncio.wait_for(task, 10)
    try:
        assert gc.get_freeze_count() > 1000
        assert gc.get_threshold() == (YOUNG_GC_THRESHOLD, *threshold[1:])
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
