"""vLLM engine (in-process AsyncLLM). Importing this package does not import vLLM."""

from cplane.workers.engines.vllm.config import VllmSettings, build_engine_args
from cplane.workers.engines.vllm.engine import VllmEngine

__all__ = ["VllmEngine", "VllmSettings", "build_engine_args"]
