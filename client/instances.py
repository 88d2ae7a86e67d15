"""The fleet's remote engine instances, in the KV bucket `<prefix>_config`
(keys `instance.<id>`): register, unregister, list. The worker processes of
each instance's group watch these keys (workers/instances.py)."""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError

from cplane.bus.kv_keys import live_entries
from cplane.bus.provision import ensure_config_bucket
from cplane.schemas.codec import encode
from cplane.schemas.instances import INSTANCE_KEY_PREFIX, InstanceSpec, instance_key
from cplane.schemas.settings import Settings
from cplane.schemas.subjects import ANY_TARGET, MODEL_TARGET_PREFIX, valid_token

_decoder = msgspec.json.Decoder(InstanceSpec)


def check_spec(spec: InstanceSpec) -> None:
    """ValueError (one line) unless the spec can be fronted."""
    iid = spec.instance_id
    if not valid_token(iid) or iid == ANY_TARGET or iid.startswith(MODEL_TARGET_PREFIX):
        raise ValueError(f"instance id {iid!r} must be a subject token (letters, digits, - _), "
                         f"not {ANY_TARGET!r} nor starting with {MODEL_TARGET_PREFIX!r}")
    url = urlsplit(spec.url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"url {spec.url!r} must be http(s)://host[:port]")
    if not spec.model_name:
        raise ValueError("model_name is empty")
    if spec.capacity < 1:
        raise ValueError("capacity must be at least 1")
    if not valid_token(spec.group):
        raise ValueError(f"group {spec.group!r} must be a subject token")
    if spec.kv_events and not spec.kv_events.startswith(("tcp://", "ipc://")):
        raise ValueError(f"kv_events {spec.kv_events!r} must be a tcp:// or ipc:// endpoint")


async def register_instance(js: JetStreamContext, settings: Settings, spec: InstanceSpec,
                            by: str = "") -> InstanceSpec:
    """Store (or replace) the instance; its group's workers front it within moments."""
    check_spec(spec)
    stored = msgspec.structs.replace(spec, added_ms=time.time() * 1000, by=by or spec.by)
    kv = await ensure_config_bucket(js, settings)
    await kv.put(instance_key(spec.instance_id), encode(stored))
    return stored


async def unregister_instance(js: JetStreamContext, settings: Settings, instance_id: str) -> bool:
    """Remove the instance (its worker drains it); False when it was not registered."""
    if not valid_token(instance_id):
        return False
    kv = await ensure_config_bucket(js, settings)
    try:
        await kv.get(instance_key(instance_id))
    except KeyNotFoundError:
        return False
    await kv.delete(instance_key(instance_id))
    return True


async def list_instances(js: JetStreamContext, settings: Settings) -> list[InstanceSpec]:
    """Every registered instance, by id."""
    kv = await ensure_config_bucket(js, settings)
    entries = await live_entries(js, kv, settings.subjects.config_bucket, INSTANCE_KEY_PREFIX)
    specs = []
    for key in sorted(entries):
        try:
            specs.append(_decoder.decode(entries[key].value or b""))
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue  # not ours to read
    return specs


__all__ = ["check_spec", "list_instances", "register_instance", "unregister_instance"]
