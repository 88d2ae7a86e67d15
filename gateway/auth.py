"""API keys -> tenants (`gateway.api_keys` in the settings). Pure.

No key configured: the gateway is open and requests carry no tenant, as
vLLM without `--api-key`. With keys: `Authorization: Bearer <key>` must name
one (else 401), and its tenant goes on the Request (fairness, accounting).
A key may carry limits (`gateway.api_key_policies`): gateway/limits.py applies
them.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from cplane.gateway.openai_map import ApiError
from cplane.schemas.settings import ApiKeyPolicy

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


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a request: the key (None when the gateway is open), its tenant, its limits."""

    key: str | None
    tenant: str | None
    policy: ApiKeyPolicy | None = None

    @property
    def owner(self) -> str:
        """The owner of what this caller stores: its tenant, "" when the gateway is open."""
        return self.tenant or ""


OPEN = Caller(key=None, tenant=None)


def key_book(api_keys: Mapping[str, str], policies: Mapping[str, ApiKeyPolicy]
             ) -> dict[str, ApiKeyPolicy]:
    """Every accepted key and its policy: plain `api_keys` have a tenant and no limits;
    `api_key_policies` add to them and win for a key in both."""
    return {**{k: ApiKeyPolicy(tenant=t) for k, t in api_keys.items()}, **policies}


def caller_for(authorization: str | None, book: Mapping[str, ApiKeyPolicy]) -> Caller | ApiError:
    """The caller of a request; OPEN when no key is configured; 401 otherwise."""
    if not book:
        return OPEN
    token = bearer(authorization)
    if token is None:
        return _UNAUTHORIZED
    found: tuple[str, ApiKeyPolicy] | None = None
    for key, policy in book.items():  # compare every key in constant time
        if hmac.compare_digest(key.encode(), token.encode()):
            found = key, policy
    if found is None:
        return _UNAUTHORIZED
    return Caller(key=found[0], tenant=found[1].tenant, policy=found[1])
