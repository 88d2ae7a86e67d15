"""vLLM's ExampleConnector with one crash fixed; loaded by vLLM, never by us.

config.py points `kv_connector_module_path` here, so vLLM's connector factory
takes this class (same name, so vLLM's checks by name still apply) inside the
engine-core process. Importing this module imports vLLM.

The bug (vLLM 0.32): for a prompt of n tokens the scheduler side looks up
the stored KV of prompt[:align(n - 1)] but the worker side then loads
prompt[:align(n)], where align(k) = (k - 1) // block * block. The two differ
exactly when n - 1 is a multiple of the block size; then a hit loads a file
nobody wrote and the engine core dies with FileNotFoundError. A PD decode
prompt is prompt + first token, so this hits every prompt whose length is a
multiple of the block size. We report a miss instead: the decode recomputes
the prompt, which is slower but correct.
"""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.example_connector import (
    ExampleConnector as _VllmExampleConnector,
)


class ExampleConnector(_VllmExampleConnector):
    def get_num_new_matched_tokens(
        self, request: Any, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        n = len(request.prompt_token_ids or [])
        if n <= 1 or (n - 1) % self._block_size == 0:
            return 0, False
        return super().get_num_new_matched_tokens(request, num_computed_tokens)
