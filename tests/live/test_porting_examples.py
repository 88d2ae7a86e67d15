"""docs/porting.md's examples, run as written against a real nats-server, an
orchestrator and two sim workers.

Each ```python block of the page that starts with `# example: NAME` is one
example; it runs with top-level await (as in `python -m asyncio`) after the
page's setup block, whose imports run here while `cp` and `client` are this
test's connections (an isolated subject prefix). Every example is run here or
listed in PENDING: a new one cannot go untested unnoticed."""

from __future__ import annotations

import ast
import inspect
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cplane.client.control import ControlPlane
from cplane.client.sdk import Client, new_request_id
from cplane.schemas.control import InstanceView, RequestPhase, WorkerReport
from cplane.schemas.messages import FinishReason, Request
from cplane.schemas.settings import Settings
from tests.natsfix import isolated_settings
from tests.stack import Running, stack
from tests.waiting import until

PAGE = Path(__file__).resolve().parents[2] / "docs" / "porting.md"
BLOCK = re.compile(r"```python\n# example: (\S+)\n(.*?)```", re.S)

# Examples of methods still being written (none now); each moves to CHECKS once they land.
PENDING: dict[str, str] = {}


def examples() -> dict[str, str]:
    found = BLOCK.findall(PAGE.read_text(encoding="utf-8"))
    names = [n for n, _ in found]
    assert len(names) == len(set(names)), f"an example name repeats: {names}"
    return dict(found)


async def run_example(name: str, ns: dict[str, Any]) -> dict[str, Any]:
    """Run example `name` in `ns` (top-level await allowed); returns `ns`."""
    code = compile(examples()[name], f"porting.md:{name}", "exec",
                   flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    result = eval(code, ns)  # the project's own documentation
    if inspect.iscoroutine(result):
        await result
    return ns


def setup_imports() -> dict[str, Any]:
    """The setup block's imports (its connections are the test's own)."""
    tree = ast.parse(examples()["setup"])
    tree.body = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    ns: dict[str, Any] = {}
    exec(compile(tree, "porting.md:setup", "exec"), ns)
    return ns


@dataclass
class Env:
    settings: Settings
    run: Running
    cp: ControlPlane
    client: Client

    def ns(self) -> dict[str, Any]:
        return {**setup_imports(), "URL": self.settings.nats.url, "cp": self.cp,
                "client": self.client}


@pytest.fixture(scope="module")
async def env(nats_url: str) -> AsyncIterator[Env]:
    settings = isolated_settings(nats_url)
    async with stack(settings, workers=2) as run:
        cp = await ControlPlane.connect(nats_url, settings, quiet_s=0.15)
        client = await Client.connect(nats_url, settings)
        try:
            yield Env(settings, run, cp, client)
        finally:
            await client.close()
            await cp.close()


def test_every_example_is_run_or_pending() -> None:
    names = set(examples())
    assert "setup" in names
    assert names - {"setup"} == set(CHECKS) | set(PENDING) | {"close"}, (
        "an example of docs/porting.md is neither run here (CHECKS) nor PENDING")
    assert "ControlPlane.connect(URL)" in examples()["setup"]


def _instances(ns: dict[str, Any]) -> None:
    views = ns["views"]
    assert [v.instance_id for v in views] == ["w0", "w1"]
    assert all(isinstance(v, InstanceView) and v.healthy and v.capacity > 0 for v in views)
    assert all(v.gpu_util is None and v.gpu_mem_total_bytes is None for v in views)  # sim
    assert [hb.worker_id for hb in ns["beats"]] == ["w0", "w1"]


def _instance_metrics(ns: dict[str, Any]) -> None:
    w = ns["w"]
    assert isinstance(w, WorkerReport) and w.worker_id == ns["worker_id"] and w.healthy


def _submit(ns: dict[str, Any]) -> None:
    final = ns["final"]
    assert final.finish_reason in (FinishReason.STOP, FinishReason.LENGTH) and final.text


def _stream(ns: dict[str, Any]) -> None:
    assert ns["chunk"].seq >= 0  # the last chunk the loop saw


def _status(ns: dict[str, Any]) -> None:
    st = ns["st"]
    assert st.phase in (RequestPhase.DECODING, RequestPhase.COMPLETED)  # LLM_DONE copies soon


def _cancel(ns: dict[str, Any]) -> None:
    res, final = ns["res"], ns["final"]
    assert res.sent and final.finish_reason is FinishReason.CANCELLED
    assert final.usage.completion_tokens < 2000


def _metrics(ns: dict[str, Any]) -> None:
    m = ns["m"]
    assert m.completed >= 1 and m.e2e.p50_ms <= m.e2e.p95_ms <= m.e2e.p99_ms


def _policy(ns: dict[str, Any]) -> None:
    assert ns["reply"].ok and ns["reply"].state.name == "slo_aware"
    assert not ns["refused"].ok and "fifo" in ns["refused"].choices


def _pd(ns: dict[str, Any]) -> None:
    assert ns["st"].orchestrators[0].pd_mode == "auto" and ns["roles"] == ["unified"]


def _get_status(ns: dict[str, Any]) -> None:
    assert ns["st"].leader and len(ns["st"].instances) == 2


def _router(ns: dict[str, Any]) -> None:
    assert ns["reply"].ok and ns["reply"].router == "least_loaded"
    assert ns["r"].router == "least_loaded" and ns["r"].router_state.name == "least_loaded"


def _register(ns: dict[str, Any]) -> None:
    # Stored in the config bucket; no worker of group `remote` runs here to front it.
    assert ns["spec"].instance_id == "vllm-a"


def _unregister(ns: dict[str, Any]) -> None:
    assert "vllm-a" not in {s.instance_id for s in ns["remaining"]}


# Example -> what must hold after it ran. Order matters: requests first, metrics after.
CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {
    "get_instances": _instances,
    "get_instance_metrics": _instance_metrics,
    "submit_request": _submit,
    "stream": _stream,
    "get_request_status": _status,
    "cancel_request": _cancel,
    "get_metrics": _metrics,
    "update_scheduling_policy": _policy,
    "update_routing_strategy": _router,
    "update_pd_config": _pd,
    "get_status": _get_status,
    "register_instance": _register,
    "unregister_instance": _unregister,
}


@pytest.mark.parametrize("name", list(CHECKS))
async def test_example(env: Env, name: str) -> None:
    CHECKS[name](await run_example(name, env.ns()))


async def test_close_example(env: Env) -> None:
    """`close` on connections of its own (the module's stay open)."""
    cp = await ControlPlane.connect(env.settings.nats.url, env.settings)
    client = await Client.connect(env.settings.nats.url, env.settings)
    await run_example("close", {**env.ns(), "cp": cp, "client": client})
    assert client.nc.is_closed and cp.nc.is_closed


async def test_views_carry_each_workers_latency(env: Env) -> None:
    """After a request of its own (xdist may give this test a module env where no
    example ran): each view's end-to-end latency is its worker's own report's (the
    join of heartbeats and reports), and some worker served it."""
    req = Request(request_id=new_request_id(), prompt="views", max_tokens=2)
    await (await env.client.submit(req)).result(30)

    async def served() -> bool:
        return any(v.latency_p95_ms > 0 for v in await env.cp.get_instance_views())

    await until(served, 15, "a view to carry the served request's latency")
    views = await env.cp.get_instance_views()
    for v in views:
        w = await env.cp.get_instance_metrics(v.instance_id)
        assert (v.latency_avg_ms, v.latency_p95_ms) == (w.latency_avg_ms, w.latency_p95_ms)
        assert v.healthy == w.healthy and v.capacity == w.capacity
