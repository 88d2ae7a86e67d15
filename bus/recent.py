"""A bounded set of recently seen ids (dedup, cancels). Oldest forgotten first."""

from __future__ import annotations

from collections import OrderedDict


class RecentIds:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, key: str) -> bool:
        """Remember `key`; False when it was already known."""
        if key in self._ids:
            self._ids.move_to_end(key)
            return False
        self._ids[key] = None
        if len(self._ids) > self.limit:
            self._ids.popitem(last=False)
        return True

    def __contains__(self, key: object) -> bool:
        return key in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def discard(self, key: str) -> None:
        self._ids.pop(key, None)
