"""Who may see a stored file or batch. Pure.

Files and batches belong to the tenant of the API key that created them
("" when the gateway is open, and for anything stored before owners were
recorded, or by `cplane batch` directly). A caller sees only its own: another
tenant's object answers exactly as a missing one (404, same body), so ids
do not leak whether they exist.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")


def owns(recorded: str | None, caller: str) -> bool:
    """True when an object recorded as `recorded` (None: no owner stored) is `caller`'s."""
    return (recorded or "") == caller


def own_only(items: Iterable[T], owner_of: Callable[[T], str | None], caller: str) -> list[T]:
    """The items `caller` owns, in their order."""
    return [item for item in items if owns(owner_of(item), caller)]
