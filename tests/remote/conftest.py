"""Fixtures of the remote-engine tests: two real `vllm serve` processes shared by the
session (ExampleConnector kv_both on one shared directory, so they also serve PD),
and `fronting()`: an InstanceSupervisor on the test's loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from cplane.schemas.instances import InstanceSpec
from cplane.schemas.messages import Role, WorkerState
from cplane.schemas.settings import Settings
from cplane.workers.instances import FrontOptions, InstanceSupervisor
from tests.vllm_model import MODEL_NAME
from tests.vllm_serve import VllmServer, start_all
from tests.waiting import until


@pytest.fixture(scope="session")
def serve_kv_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serve-kv")


@pytest.fixture(scope="session")
def vllm_servers(vllm_model_dir: Path, serve_kv_dir: Path) -> Iterator[list[VllmServer]]:
    servers = start_all([VllmServer(vllm_model_dir, n, kv_dir=serve_kv_dir) for n in "ab"])
    yield servers
    for s in servers:
        s.stop()


def spec(server: VllmServer, instance_id: str, model_dir: Path, *,
         role: Role = Role.UNIFIED, group: str = "remote", kv_events: bool = True,
         capacity: int = 16) -> InstanceSpec:
    return InstanceSpec(instance_id=instance_id, url=server.url, model_name=MODEL_NAME,
                        role=role, group=group, capacity=capacity, tokenizer=str(model_dir),
                        kv_events=server.kv_events if kv_events else "")


FAST = FrontOptions(stall_timeout_s=30.0, probe_s=0.25, start_timeout_s=3.0, retry_s=0.5,
                    down_after=2, resync_s=2.0, cooldown_s=2.0)


def serving(sup: InstanceSupervisor, ids: list[str]) -> bool:
    """Every instance in `ids` has a Worker consuming and READY."""
    return all(
        (f := sup.fronts.get(i)) is not None and f.worker is not None
        and f.worker.state is WorkerState.READY and f.worker.consuming
        for i in ids)


@contextlib.asynccontextmanager
async def fronting(settings: Settings, static: list[InstanceSpec], group: str | None = None,
                   wait_for: list[str] | None = None) -> AsyncIterator[InstanceSupervisor]:
    sup = InstanceSupervisor(settings, static, group, FAST)
    stop = asyncio.Event()
    task = asyncio.create_task(sup.run(stop))
    try:
        ids = wait_for if wait_for is not None else [s.instance_id for s in static]
        await until(lambda: serving(sup, ids) or task.done(), 60, "instances fronted")
        if task.done():
            task.result()
        yield sup
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
