"""Listing a KV bucket's keys without nats-py's `kv.keys()`.

`kv.keys()` reads an ordered consumer and stops at the first "no more pending"
signal, which can come before it has handed over what the server already
delivered: under load, or right after a delete, it lists nothing (NoKeysError)
though keys exist (seen: `cplane instances list` empty with one instance left,
batch listings empty). The bucket stream's subject counts have no such race.
"""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue


async def kv_keys(js: JetStreamContext, bucket: str, prefix: str = "") -> list[str]:
    """Keys under `prefix` with a message on their subject, by name. A deleted key's
    marker counts too: read each with `kv.get` (or `live_entries`)."""
    pre = f"$KV.{bucket}."
    info = await js.stream_info(f"KV_{bucket}", subjects_filter=f"{pre}{prefix}>")
    return sorted(s[len(pre):] for s in (info.state.subjects or {}))


async def live_entries(js: JetStreamContext, kv: KeyValue, bucket: str, prefix: str = ""
                       ) -> dict[str, KeyValue.Entry]:
    """Key -> current entry, for the keys under `prefix` that hold a value now."""
    out: dict[str, KeyValue.Entry] = {}
    for key in await kv_keys(js, bucket, prefix):
        try:
            out[key] = await kv.get(key)  # a deleted key: KeyNotFoundError
        except KeyNotFoundError:
            continue
    return out


__all__ = ["kv_keys", "live_entries"]
