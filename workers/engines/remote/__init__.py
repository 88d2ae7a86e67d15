"""Engines that run elsewhere: an OpenAI-compatible server (`vllm serve`...) by address."""

from cplane.workers.engines.remote.engine import RemoteEngine, RemoteSettings

__all__ = ["RemoteEngine", "RemoteSettings"]
