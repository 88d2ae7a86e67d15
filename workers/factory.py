"""Builds the engine a worker was asked for. vLLM is imported only when chosen."""

from __future__ import annotations

from typing import Any

from cplane.schemas.settings import Settings
from cplane.workers.engines.base import Engine
from cplane.workers.engines.sim import SimEngine


def build_engine(
    kind: str, settings: Settings, vllm_options: dict[str, Any] | None = None
) -> Engine:
    if kind == "sim":
        return SimEngine(settings.sim, model=settings.worker.model)
    if kind == "vllm":
        from cplane.workers.engines.vllm import VllmEngine, VllmSettings

        opts = dict(vllm_options or {})
        opts.setdefault("model", settings.worker.model)
        opts.setdefault("max_num_seqs", settings.worker.capacity)
        return VllmEngine(VllmSettings(**opts))
    raise ValueError(f"unknown engine {kind!r}: choose sim or vllm")
