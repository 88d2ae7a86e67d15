"""vLLM engine (in-process AsyncLLM). Importing this package does not import vLLM."""

from workers.engines.vllm.config import VllmSettings, build_engine_args
from workers.engines.vllm.engine import VllmEngine

__all__ = ["VllmEngine", "VllmSettings", "build_engine_args"]
