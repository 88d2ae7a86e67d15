"""Session fixtures for tests that run real vLLM engines on a tiny model.

Import them into a conftest (`from tests.vllm_fixtures import *`) or a test
module. Engines start once per session (~10 s each on 2 CPU cores) and are
shared; tests must use unique request ids and must not shut them down.

- `vllm_model_dir`: directory of the tiny random Llama (tests/vllm_model.py).
- `vllm_kv_dir`: the ExampleConnector's shared KV directory.
- `vllm_engine`: a started unified VllmEngine (priority scheduling,
  ExampleConnector kv_both); it is also the prefill engine.
- `vllm_prefill_engine`: the same object as `vllm_engine`.
- `vllm_decode_engine`: a second started VllmEngine (fcfs, ExampleConnector
  kv_both, same shared directory) for the decode role.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from cplane.workers.engines.vllm import VllmEngine, VllmSettings
from tests.vllm_model import MODEL_NAME, build_tiny_llama

__all__ = [
    "vllm_decode_engine",
    "vllm_engine",
    "vllm_kv_dir",
    "vllm_model_dir",
    "vllm_prefill_engine",
]

# Set before any engine starts (vLLM reads them when it builds an engine).
#  - HF_HUB_OFFLINE: nothing is downloaded.
#  - VLLM_ENABLE_V1_MULTIPROCESSING=0: on CPU the model then runs inside the
#    engine-core process instead of one more spawned worker process: start-up
#    ~10 s instead of ~20 s, one process (~0.6 GB) less per engine, and no
#    OpenMP core binding (which pins every engine's worker to core 0).
#  - VLLM_CPU_KVCACHE_SPACE would override kv_cache_memory_bytes: unset it.
_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


def apply_vllm_test_env() -> None:
    for key, value in _ENV.items():
        os.environ.setdefault(key, value)
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)


def tiny_settings(model_dir: Path, **overrides: Any) -> VllmSettings:
    """Settings for the tiny model on CPU: small KV cache, no compilation."""
    base = VllmSettings(
        model=str(model_dir),
        served_model_name=MODEL_NAME,
        dtype="float32",  # exact and safe on AVX2-only CPUs (bf16 not tried)
        max_model_len=512,
        block_size=32,
        enforce_eager=True,
        kv_cache_memory_bytes=64 << 20,  # 16k tokens of this model's KV
        max_num_seqs=64,
        rate_window_s=10.0,
    )
    return replace(base, **overrides)


@pytest.fixture(scope="session")
def vllm_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import vllm  # noqa: F401 - vLLM tests fail, never skip, where vLLM is missing

    apply_vllm_test_env()
    return build_tiny_llama(tmp_path_factory.mktemp("vllm") / MODEL_NAME)


@pytest.fixture(scope="session")
def vllm_kv_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vllm-kv")


async def _started(settings: VllmSettings) -> VllmEngine:
    engine = VllmEngine(settings)
    await engine.start()
    return engine


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def vllm_engine(vllm_model_dir: Path, vllm_kv_dir: Path) -> AsyncIterator[VllmEngine]:
    engine = await _started(
        tiny_settings(
            vllm_model_dir,
            scheduling_policy="priority",
            kv_connector="ExampleConnector",
            kv_shared_path=str(vllm_kv_dir),
        )
    )
    yield engine
    await engine.shutdown()


@pytest.fixture(scope="session")
def vllm_prefill_engine(vllm_engine: VllmEngine) -> VllmEngine:
    return vllm_engine


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def vllm_decode_engine(vllm_model_dir: Path, vllm_kv_dir: Path) -> AsyncIterator[VllmEngine]:
    engine = await _started(
        tiny_settings(
            vllm_model_dir, kv_connector="ExampleConnector", kv_shared_path=str(vllm_kv_dir)
        )
    )
    yield engine
    await engine.shutdown()
