"""What the client raises: refusals at publish time and requests that ended badly."""

from __future__ import annotations

from nats.errors import MaxPayloadError, NoRespondersError
from nats.js.errors import APIError, NoStreamResponseError, ServiceUnavailableError

from cplane.schemas.messages import ErrorReply, Final

STREAM_FULL_CODES = {10077, 10078, 10047}  # max msgs / max bytes / storage resources
# A JetStream publish that no stream answered (no responders) or that was answered
# 503: nothing was stored, so sending it again is safe. A cluster answers so for
# the seconds it takes to elect a stream's new leader.
NOT_STORED = (NoStreamResponseError, ServiceUnavailableError)


class RequestFailed(Exception):
    """The request ended with an ErrorReply."""

    def __init__(self, error: ErrorReply) -> None:
        super().__init__(f"{error.code}: {error.message}")
        self.error = error


class StreamGap(Exception):
    """The stream ended with chunks it never delivered: seen neither live nor in LLM_OUT
    (aged out of its retention). `final` is the whole answer (its `text` is
    complete); `missing` is the range of seqs no reader can get any more."""

    def __init__(self, final: Final, first_missing: int) -> None:
        super().__init__(f"{final.request_id}: chunks {first_missing}..{final.chunks - 1} "
                         "were never delivered and are no longer stored")
        self.final = final
        self.missing = range(first_missing, final.chunks)


class Overloaded(Exception):
    """The request stream refused the publish (full): try again later."""


class RejectedAtPublish(ValueError):
    """The request could not be published as given (too large, unknown priority...)."""


class Unavailable(TimeoutError):
    """No stream took the request within the publish timeout: none covers its subject,
    or the one that does has no leader yet (a cluster electing one after a node
    died). Nothing was stored: publishing it again is safe."""


def publish_error(exc: Exception, subject: str) -> Exception:
    """The exception a failed request publish means to the caller (`exc` if no other)."""
    if isinstance(exc, APIError) and exc.err_code in STREAM_FULL_CODES:
        return Overloaded(f"request stream is full ({exc.description}); retry later")
    if isinstance(exc, (NoRespondersError, *NOT_STORED)):
        return Unavailable(
            f"no stream took {subject!r}: LLM_REQ is missing, or has no leader yet "
            "(a cluster electing one); retry later"
        )
    if isinstance(exc, MaxPayloadError):
        return RejectedAtPublish("request exceeds the server's max_payload")
    return exc
