"""The fleet's remote engine instances: OpenAI-compatible servers (`vllm serve`,
SGLang, ...) that already run somewhere and are served by address.

Each instance is one `InstanceSpec` (JSON) under the key `instance.<id>` of the
KV bucket `<prefix>_config` (`cplane instances add|remove|list`,
`ControlPlane.register_instance`). Worker processes started with
`cplane worker --engine openai --group G` watch the keys and front every
instance of their group: one worker identity (heartbeats, work subjects) per
instance, named by its `instance_id`. Deleting the key drains the instance:
its running requests finish (or move on) before it goes.
"""

from __future__ import annotations

from typing import Literal

from cplane.schemas.messages import Base, Role

INSTANCE_KEY_PREFIX = "instance."
DEFAULT_GROUP = "remote"

# How the worker talks to the server: "vllm" sends token ids and reads them back
# (`return_token_ids`, `/tokenize`), so a request can continue exactly where it
# stopped on another instance; "openai" is text only (any OpenAI-compatible
# server): a request that must continue mid-way fails with engine_error there.
Api = Literal["vllm", "openai"]


class InstanceSpec(Base, frozen=True, kw_only=True):
    """One remote engine instance (the specification's `ExecutionInstance`)."""

    instance_id: str  # a subject token: the worker id it is routed by
    url: str  # base URL of the server, e.g. http://10.0.0.7:8000
    model_name: str  # the model name the server serves (and requests name)
    role: Role = Role.UNIFIED  # unified | prefill | decode
    api: Api = "vllm"
    group: str = DEFAULT_GROUP  # which worker processes front it
    capacity: int = 64  # requests held at once (the server's max_num_seqs is a good value)
    tensor_parallel_size: int = 1  # what the server runs with (informational)
    gpu_count: int = 1
    # vLLM's KV-cache event publisher (`--kv-events-config`, ZMQ), e.g.
    # tcp://10.0.0.7:5557: precise prefix routing over this instance's cache.
    kv_events: str = ""
    # Local tokenizer (directory or HF id) matching the server's: token ids are
    # then made here, exactly as the orchestrator hashes prompts. "" = the server's
    # /tokenize (api vllm).
    tokenizer: str = ""
    # The worker reads the server's API key from this environment variable (a key is
    # never stored in the bucket); "" = none sent.
    api_key_env: str = ""
    added_ms: float = 0.0
    by: str = ""


def instance_key(instance_id: str) -> str:
    return INSTANCE_KEY_PREFIX + instance_id


__all__ = ["DEFAULT_GROUP", "INSTANCE_KEY_PREFIX", "Api", "InstanceSpec", "instance_key"]
