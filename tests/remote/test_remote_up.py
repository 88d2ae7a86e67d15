"""`cplane up --engine openai --url ...` in front of a running `vllm serve`, as a user
runs it: the README's requests through every way in (the CLI, raw JSON on a
subject, the OpenAI SDK through the gateway, plain and streamed), and the
registry commands against the same stack."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from openai import OpenAI

from tests.vllm_model import MODEL_NAME
from tests.vllm_serve import VllmServer
from tests.waiting import until_up

CPLANE = [sys.executable, "-m", "cplane.cli"]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory,
       vllm_servers: list[VllmServer]) -> Iterator[tuple[str, str]]:
    log = tmp_path_factory.mktemp("up-remote") / "up.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([*CPLANE, "up", "--engine", "openai", "--url",
                                 vllm_servers[0].url, "--model", MODEL_NAME],
                                stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        url = until_up(proc, log, timeout=120)
        m = re.search(r"OpenAI API at (http://127\.0\.0\.1:\d+/v1)", log.read_text())
        assert m, log.read_text()
        yield url, m.group(1)
    finally:
        proc.terminate()
        proc.wait(60)
    assert proc.returncode == 0, log.read_text()[-2000:]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CPLANE, *args], capture_output=True, text=True, timeout=120)


def test_generate_and_the_openai_sdk_through_a_remote_server(up: tuple[str, str]) -> None:
    nats_url, api = up
    res = cli("generate", "hello world", "--max-tokens", "8", "--model", MODEL_NAME,
              "--nats-url", nats_url)
    assert res.returncode == 0, res.stderr
    assert "length | 8 tokens" in res.stderr
    client = OpenAI(base_url=api, api_key="none")
    chat = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
        temperature=0.0)
    assert chat.usage is not None and chat.usage.completion_tokens == 6
    stream = client.completions.create(model=MODEL_NAME, prompt="Once upon", max_tokens=5,
                                       temperature=0.0, stream=True)
    assert sum(1 for c in stream if c.choices and c.choices[0].text) >= 1


async def test_raw_json_on_a_subject_through_a_remote_server(up: tuple[str, str]) -> None:
    nats_url, _ = up
    nc = await nats.connect(nats_url)
    try:
        sub = await nc.subscribe("llm.done.i.raw-remote-1")
        await nc.jetstream().publish("llm.req.normal.standard", json.dumps({
            "request_id": "raw-remote-1", "prompt": "hello", "max_tokens": 4,
            "model": MODEL_NAME}).encode())
        final = json.loads((await sub.next_msg(timeout=60)).data)
        assert final["type"] == "final" and final["usage"]["completion_tokens"] == 4
        assert final["workers"] == ["remote"]
    finally:
        await nc.close()


def test_instances_commands_against_the_stack(up: tuple[str, str],
                                              vllm_servers: list[VllmServer]) -> None:
    nats_url, _ = up
    b = vllm_servers[1]
    res = cli("instances", "add", "second", "--url", b.url, "--model", MODEL_NAME,
              "--nats-url", nats_url)
    assert res.returncode == 0, res.stderr
    listed = cli("instances", "list", "--json", "--nats-url", nats_url)
    assert listed.returncode == 0, listed.stderr
    assert [r["instance_id"] for r in json.loads(listed.stdout)] == ["second"]
    bad = cli("instances", "add", "x y", "--url", b.url, "--model", MODEL_NAME,
              "--nats-url", nats_url)
    assert bad.returncode == 1 and "subject token" in bad.stderr
    assert "Traceback" not in bad.stderr
    res = cli("instances", "remove", "second", "--nats-url", nats_url)
    assert res.returncode == 0, res.stderr
    again = cli("instances", "remove", "second", "--nats-url", nats_url)
    assert again.returncode == 1 and "not registered" in again.stderr
