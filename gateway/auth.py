"""API keys -> tenants (`gateway.api_keys` in the settings). Pure.

No key configured: the gateway is open and requests carry no tenant, as
vLLM without `--api-key`. With keys: `Authorization: Bearer <key>` must name
one (else 401), and its tenant goes on the Request (fairness, accounting).
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from cplane.gateway.openai_map import ApiError

_UNAUTHORIZED = ApiError(401, "a valid API key is required: Authorization: Bearer <key>",
                         type="authentication_error", code="invalid_api_key")


def bearer(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def tenant_for(authorization: str | None, keys: Mapping[str, str]) -> str | ApiError | None:
    """The tenant of the request's key; None when the gateway is open; 401 otherwise."""
    if not keys:
        return None
    token = bearer(authorization)
    if token is None:
        return _UNAUTHORIZED
    found: str | None = None
    for key, tenant in keys.items():  # compare every key in constant time
        if hmac.compare_digest(key.encode(), token.encode()):
            found = tenant
    return _UNAUTHORIZED if found is None else found
