"""Python client SDK of cplane."""

from cplane.client.sdk import (
    Client,
    Overloaded,
    RejectedAtPublish,
    RequestFailed,
    RequestHandle,
    StreamGap,
    Unavailable,
    new_request_id,
)

__all__ = [
    "Client",
    "Overloaded",
    "RejectedAtPublish",
    "RequestFailed",
    "RequestHandle",
    "StreamGap",
    "Unavailable",
    "new_request_id",
]
