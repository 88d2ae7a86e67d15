"""Partitioned leadership, the pure part: which partition a request belongs to, and
which partitions a replica should lead. No I/O (orchestrator/partition_leases.py
holds the leases).

A partition is one model's pool (`orchestrator.partitions`) or the default
partition (every other model, and requests that name no pool): each has its own
lease in `<prefix>_leases` (`lease_key`) and its own request consumers, so
different replicas lead different pools at once. Live replicas announce
themselves with a TTL'd key (`replica_key`); every replica computes the same
`assign`ment from the same view: each model pool goes to the replica that ranks
highest for it by rendezvous hash among those still under the quota
`ceil(pools / replicas)`, and the default partition to one that leads the
fewest. See docs/replicas.md.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from cplane.schemas.subjects import DEFAULT_PARTITION, partition_token

LEASE_KEY = "orchestrator"  # the default partition's lease: the unpartitioned fleet's
REPLICA_PREFIX = "replica."


def lease_key(pool: str) -> str:
    """The lease of one partition (its pool token; DEFAULT_PARTITION: `orchestrator`)."""
    return f"{LEASE_KEY}.{pool}" if pool else LEASE_KEY


def replica_key(replica: str) -> str:
    """A live replica's announcement (rewritten every renewal; gone `lease_ttl_s` after)."""
    return f"{REPLICA_PREFIX}{replica}"


def describe(pool: str) -> str:
    return pool or "default"


@dataclass(frozen=True, slots=True)
class PartitionMap:
    """The configured partitions: model name -> pool token, and back."""

    models: Mapping[str, str]  # model -> pool token

    @classmethod
    def of(cls, partitions: Sequence[str]) -> PartitionMap:
        """Raises ValueError on an empty name or two names with one token."""
        tokens: dict[str, str] = {}
        for model in partitions:
            if not model:
                raise ValueError("orchestrator.partitions: a partition needs a model name")
            tok = partition_token(model)
            if tok in tokens.values() and tokens.get(model) != tok:
                raise ValueError(f"orchestrator.partitions: {model!r} has the pool token of "
                                 "another partition")
            tokens[model] = tok
        return cls(tokens)

    @property
    def enabled(self) -> bool:
        return bool(self.models)

    @property
    def pools(self) -> tuple[str, ...]:
        """Every partition's pool token, the default partition ("") first."""
        return (DEFAULT_PARTITION, *sorted(set(self.models.values())))

    def of_model(self, model: str) -> str:
        """The pool token of the partition that serves `model` ("" = the default)."""
        return self.models.get(model, DEFAULT_PARTITION)


def rank(pool: str, replica: str) -> int:
    """Rendezvous (highest random weight) score of `replica` for `pool`."""
    digest = hashlib.blake2b(f"{pool}\0{replica}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def assign(pools: Sequence[str], replicas: Iterable[str]) -> dict[str, str]:
    """Pool -> the replica that should lead it. The model pools first: each to the
    best-ranked replica still under the quota ceil(model pools / replicas), pools
    taken in a fixed order (so N replicas lead N pools); then the default partition
    to the best-ranked of the replicas that lead the fewest. Every replica with the
    same view computes the same answer."""
    live = sorted(set(replicas))
    if not live:
        return {}
    models = sorted(p for p in pools if p != DEFAULT_PARTITION)
    quota = math.ceil(len(models) / len(live)) if models else 0
    count = dict.fromkeys(live, 0)
    out: dict[str, str] = {}
    for pool in models:
        for r in sorted(live, key=lambda r: rank(pool, r), reverse=True):
            if count[r] < quota:
                out[pool] = r
                count[r] += 1
                break
    if DEFAULT_PARTITION in pools:
        out[DEFAULT_PARTITION] = min(live, key=lambda r: (
            count[r], -rank(DEFAULT_PARTITION, r)))
    return out


@dataclass(frozen=True, slots=True)
class LeasePlan:
    """What a replica does with the leases at one renewal."""

    acquire: tuple[str, ...] = ()  # try `create` on these (free now)
    release: tuple[str, ...] = ()  # step down and delete: another live replica's share


def plan_leases(me: str, pools: Sequence[str], replicas: Iterable[str],
                holders: Mapping[str, str | None], free_before: Iterable[str]) -> LeasePlan:
    """Acquire a free partition assigned to `me`, or one that was free at the last
    renewal too (its assignee did not take it: the views differ, or it is stalled);
    release one partition `me` leads that is assigned to another live replica (one a
    renewal, so a fleet rebalances gently). `holders`: each pool's lease holder now
    (None: free)."""
    live = {*replicas, me}
    target = assign(pools, live)
    earlier = set(free_before)
    acquire = tuple(p for p in pools if holders.get(p) is None
                    and (target.get(p) == me or p in earlier))
    release = tuple(p for p in pools if holders.get(p) == me
                    and target.get(p) not in (None, me))[:1]
    return LeasePlan(acquire, release)


__all__ = ["LEASE_KEY", "REPLICA_PREFIX", "LeasePlan", "PartitionMap", "assign", "describe",
           "lease_key", "plan_leases", "rank", "replica_key"]
