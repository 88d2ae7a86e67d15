"""Fast reads of JetStream delivery metadata from a message's reply subject.

nats-py's `msg.metadata` builds datetimes; on the hot path we only need the
store timestamp and the delivery count, so we read the tokens directly.
Formats: `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts_ns>.<pending>`
and the v2 form with `<domain>.<account_hash>` after `ACK` (and a random tail).
"""

from __future__ import annotations


def _tokens(reply: str) -> list[str]:
    parts = reply.split(".")
    if len(parts) == 9:
        return parts[2:]
    if len(parts) >= 11:
        return parts[4:11]
    raise ValueError(f"not a JetStream ack subject: {reply!r}")


def stored_ms(reply: str) -> float:
    """When the server stored the message, ms since the epoch."""
    return int(_tokens(reply)[5]) / 1e6


def delivered(reply: str) -> int:
    """How many times this message has been delivered (1 = first time)."""
    return int(_tokens(reply)[2])


def stream_seq(reply: str) -> int:
    return int(_tokens(reply)[3])


def delivery(reply: str) -> tuple[int, int, float]:
    """(stream sequence, times delivered, stored ms since the epoch) in one parse."""
    t = _tokens(reply)
    return int(t[3]), int(t[2]), int(t[5]) / 1e6

