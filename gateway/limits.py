"""What a caller may send and how often: the gateway's admission decisions. Pure.

Each function decides from plain values and returns the refusal (an
`ApiError`) or None; the ASGI shell (gateway/guard.py) keeps the counters
and clocks and applies the answer.

- Body size: a declared `Content-Length` over the limit is refused before a
  byte of the body is read; what arrives is counted against the same limit.
- Rate: one token bucket per API key (`max_rps`, burst `max(1, max_rps)`).
- Open requests: per key and overall; a request holds its slot until its last
  byte went out (an SSE stream until `[DONE]`).
- Priority ceiling: a key's `max_priority`; asking for more is 403, never a
  quiet downgrade.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cplane.gateway.openai_map import ApiError
from cplane.schemas.messages import Priority

FILES_PATH = "/v1/files"
# A multipart upload carries its file plus boundaries and part headers.
MULTIPART_SLACK_BYTES = 64 << 10


@dataclass(frozen=True, slots=True)
class BodyLimit:
    """How much of a request body the gateway reads, and for how long."""

    max_bytes: int
    timeout_s: float


def body_limit(method: str, path: str, *, max_body_bytes: int, max_file_bytes: int,
               body_timeout_s: float, upload_timeout_s: float) -> BodyLimit:
    """An upload (POST /v1/files) gets the file limits; every other body the JSON ones."""
    if method == "POST" and path.rstrip("/") == FILES_PATH:
        return BodyLimit(max_file_bytes + MULTIPART_SLACK_BYTES, upload_timeout_s)
    return BodyLimit(max_body_bytes, body_timeout_s)


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"the body exceeds {limit} bytes", code="too_large")


def too_slow(timeout_s: float) -> ApiError:
    return ApiError(408, f"the body did not arrive within {timeout_s:g} s",
                    code="request_timeout")


def declared_size(content_length: str | None, limit: int) -> ApiError | None:
    """413 at once for a declared body over `limit` (a missing or odd header passes:
    the bytes are counted as they arrive, and the HTTP parser refuses bad lengths)."""
    if content_length is None:
        return None
    text = content_length.strip()
    if not text.isdigit():
        return None
    # Compare by digit count first: a 5,000-digit length never becomes an int.
    if len(text.lstrip("0")) > len(str(limit)) or int(text) > limit:
        return too_large(limit)
    return None


# -- rate ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TokenBucket:
    """A key's bucket: `tokens` left at time `at_s` (monotonic seconds)."""

    tokens: float
    at_s: float


def take(bucket: TokenBucket | None, rate: float, now_s: float) -> tuple[TokenBucket, float]:
    """Take one token: (the new bucket, 0.0) when there was one, else (the bucket
    unchanged but refilled, the seconds until the next token)."""
    burst = max(1.0, rate)
    if bucket is None:
        tokens = burst
    else:
        tokens = min(burst, bucket.tokens + max(0.0, now_s - bucket.at_s) * rate)
    if tokens >= 1.0:
        return TokenBucket(tokens - 1.0, now_s), 0.0
    return TokenBucket(tokens, now_s), (1.0 - tokens) / rate


def rate_limited(wait_s: float, rate: float) -> ApiError:
    return ApiError(429, f"this API key may send {rate:g} requests per second",
                    type="rate_limit_error", code="rate_limited",
                    retry_after_s=max(1, math.ceil(wait_s)))


# -- open requests -----------------------------------------------------------------
def admit(open_for_key: int, open_total: int, *, key_cap: int | None, total_cap: int,
          retry_after_s: float) -> ApiError | None:
    """429 when the key (`key_cap`, None = no per-key cap) or the gateway is at its cap."""
    retry = max(1, math.ceil(retry_after_s))
    if key_cap is not None and open_for_key >= key_cap:
        return ApiError(429, f"this API key has {open_for_key} requests open (at most "
                             f"{key_cap}); wait for one to finish",
                        type="rate_limit_error", code="too_many_streams", retry_after_s=retry)
    if open_total >= total_cap:
        return ApiError(429, f"the gateway has {open_total} requests open (at most "
                             f"{total_cap}); try again later",
                        type="rate_limit_error", code="too_many_streams", retry_after_s=retry)
    return None


# -- priority ceiling ---------------------------------------------------------------
def priority_allowed(asked: Priority, ceiling: str | None) -> ApiError | None:
    """403 when `asked` is more urgent than the key's `max_priority` (None = any)."""
    if ceiling is None:
        return None
    top = Priority(ceiling)
    if asked.level >= top.level:
        return None
    return ApiError(403, f"this API key may ask for priority {top.value!r} at most, "
                         f"not {asked.value!r}",
                    type="permission_error", param="priority", code="priority_not_allowed")
