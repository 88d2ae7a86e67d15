"""Encoders and decoders, built once and reused (msgspec's advice)."""

from __future__ import annotations

from typing import Any

import msgspec

from cplane.schemas.messages import (
    Cancel,
    ErrorReply,
    Fin,
    Final,
    Heartbeat,
    KvEvents,
    Output,
    Request,
    TokenChunk,
    WorkBatch,
)

encoder = msgspec.json.Encoder()
encode = encoder.encode

request_decoder = msgspec.json.Decoder(Request)
work_decoder = msgspec.json.Decoder(WorkBatch)
output_decoder = msgspec.json.Decoder(Output)
chunk_decoder = msgspec.json.Decoder(TokenChunk)
final_decoder = msgspec.json.Decoder(Final | ErrorReply)
heartbeat_decoder = msgspec.json.Decoder(Heartbeat)
cancel_decoder = msgspec.json.Decoder(Cancel)
kv_events_decoder = msgspec.json.Decoder(KvEvents)
fin_decoder = msgspec.json.Decoder(Fin)
_loose = msgspec.json.Decoder()


def sniff_request_id(data: bytes) -> str | None:
    """Best effort: the `request_id` of a body that failed strict decoding."""
    try:
        obj: Any = _loose.decode(data)
    except msgspec.DecodeError:
        return None
    if isinstance(obj, dict):
        rid = obj.get("request_id")
        if isinstance(rid, str) and rid:
            return rid
    return None
