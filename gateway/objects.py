"""Objects of the batch object store read out one chunk at a time.

nats-py's `ObjectStore.get` either gathers the whole object in memory or
writes it into a file from an executor thread, as fast as its ordered push
consumer delivers; neither suits an HTTP download to a slow client. Here the
object's chunks (messages on `$O.<bucket>.C.<nuid>` in stream `OBJ_<bucket>`,
the object store's wire format) are fetched one by one with a stream
message get, as the client takes them: one chunk (128 KiB by default) in
memory per download, and a client that reads slowly slows only its reads.

The SHA-256 of what was sent is checked against the object's digest at the
end; a mismatch (or a chunk gone meanwhile) raises, and the HTTP server cuts
the connection before the declared Content-Length: the client sees a
truncated download, never a silently wrong one.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import AsyncIterator

from nats.js import JetStreamContext
from nats.js.api import ObjectInfo
from nats.js.object_store import (
    OBJ_CHUNKS_PRE_TEMPLATE,
    OBJ_DIGEST_TYPE,
    OBJ_STREAM_TEMPLATE,
)


class CorruptObject(RuntimeError):
    """The chunks read do not add up to the object's size or digest."""


async def chunks(js: JetStreamContext, info: ObjectInfo) -> AsyncIterator[bytes]:
    """The object's bytes, chunk by chunk, in order (a link or an empty object: none)."""
    size = info.size or 0
    if size == 0 or info.is_link():
        return
    stream = OBJ_STREAM_TEMPLATE.format(bucket=info.bucket)
    subject = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=info.bucket, obj=info.nuid)
    digest = hashlib.sha256()
    seq, sent = 1, 0
    while sent < size:
        msg = await js.get_msg(stream, seq=seq, subject=subject, next=True)
        data = msg.data or b""
        if not data or msg.seq is None:
            raise CorruptObject(f"{info.name}: an empty chunk after {sent} of {size} bytes")
        digest.update(data)
        sent += len(data)
        seq = msg.seq + 1
        yield data
    want = (info.digest or "").removeprefix(OBJ_DIGEST_TYPE).removeprefix(OBJ_DIGEST_TYPE.upper())
    if sent != size or digest.digest() != base64.urlsafe_b64decode(want):
        raise CorruptObject(f"{info.name}: {sent} bytes read of {size}, or a wrong digest")
