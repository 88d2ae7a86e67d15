"""Shared fixtures, and the markers each test gets from its folder.

Layout (see tests/README.md):
  tests/unit/   pure: no nats-server, no subprocess            -> marker `unit`
  tests/live/   real nats-server, sim engines, subprocess CLIs -> marker `live`
  tests/vllm/   needs vLLM (CPU wheel or GPU)                   -> marker `vllm`
  tests/chaos/  separate processes, kill -9, broker restarts    -> marker `chaos`
  tests/remote/ real `vllm serve` processes behind remote workers -> marker `remote`
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS

from tests.natsfix import nats_server
from tests.vllm_fixtures import *  # noqa: F403 - session engines shared by every vLLM test

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_TESTS = Path(__file__).resolve().parent
FOLDER_MARKERS = ("unit", "live", "vllm", "chaos", "security", "remote")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test by the folder it lives in, so `-m unit` / `-m "not vllm"` select by part."""
    for item in items:
        try:
            part = Path(str(item.path)).resolve().relative_to(_TESTS).parts[0]
        except ValueError:
            continue
        if part in FOLDER_MARKERS:
            item.add_marker(getattr(pytest.mark, part))


@pytest.fixture(scope="session")
def nats_url() -> Iterator[str]:
    with nats_server() as url:
        yield url


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    conn = await nats.connect(nats_url)
    yield conn
    await conn.close()
