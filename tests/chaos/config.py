"""The chaos run's knobs: ChaosConfig, read from the environment (CPLANE_CHAOS_*).

Besides the load and the fault pacing, it scales the services' streams for
the run (LLM_OUT's max_age, the duplicate windows, LLM_REQ's size) through
the environment it gives them, and picks each orchestrator start's router.

Routers: `CPLANE_CHAOS_ROUTER` (env) names the orchestrators' router
(`CPLANE__ORCHESTRATOR__ROUTER`); unset, one of least_loaded, prefix_aware,
affinity, pool is picked from the seed; `rotate` gives each replica start the
next one of those four.

Tenants: `CPLANE_CHAOS_TENANTS` (comma-separated, at least two; default
acme,globex) names the tenant accounts the load publishes from (tenants.py).
Worker ids are known up front (each its own principal): `worker_ids()`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

ROUTER_CHOICES = ("least_loaded", "prefix_aware", "affinity", "pool")


def _env_num(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def _env_range(name: str, default: tuple[int, int]) -> tuple[int, int]:
    raw = os.environ.get(name)
    if not raw:
        return default
    lo, _, hi = raw.partition("-")
    return int(lo), int(hi or lo)


@dataclass
class ChaosConfig:
    requests: int = 300
    workers: int = 3
    capacity: int = 4
    rate: float = 10.0  # requests/s published outside the overload phase
    req_max_msgs: int = 24  # LLM_REQ size: small, so overload is refused at publish time
    kill_every_s: float = 3.0
    pause_every_s: float = 6.0  # a streaming worker SIGSTOPped 4-12 s this often
    overload_s: float = 8.0
    drain_s: float = 120.0
    seed: int = 0
    router: str = ""  # "" = one of ROUTER_CHOICES from the seed; "rotate"; or a router name
    out_max_age_s: float = 20.0  # LLM_OUT's max_age in this run (default 300 s)
    dup_window_s: float = 10.0  # duplicate window of LLM_REQ / WORK / OUT / DONE (default 120 s)
    long_share: float = 0.04
    long_tokens: tuple[int, int] = (3000, 5500)  # ~7 ms a token on the sim engine: 21-40 s
    resubmit: int = 6  # finished ids published again, half at 60%, half after the load
    resubmit_wait_s: float = 25.0
    partitions: bool = True  # one worker and orch1 behind proxies
    tenants: tuple[str, ...] = ("acme", "globex")  # the load's tenant accounts (>= 2)
    cluster: int = 0  # > 0: that many nats-server nodes, streams R3 (cluster.py); no proxies
    # Partitioned leadership (docs/replicas.md): models whose pools get a lease each
    # (`orchestrator.partitions`); the load names them (half with the pool token).
    leader_partitions: tuple[str, ...] = ()

    @classmethod
    def from_env(cls) -> ChaosConfig:
        n = int(os.environ.get("CPLANE_CHAOS_REQUESTS", "300"))
        cluster = int(_env_num("CPLANE_CHAOS_CLUSTER", 0))
        return cls(
            requests=n,
            workers=int(_env_num("CPLANE_CHAOS_WORKERS", 3)),
            capacity=int(_env_num("CPLANE_CHAOS_CAPACITY", 4)),
            rate=_env_num("CPLANE_CHAOS_RATE", 10.0),
            req_max_msgs=int(_env_num("CPLANE_CHAOS_REQ_MAX_MSGS", 24)),
            kill_every_s=_env_num("CPLANE_CHAOS_KILL_EVERY_S", 3.0),
            pause_every_s=_env_num("CPLANE_CHAOS_PAUSE_EVERY_S", 6.0),
            overload_s=_env_num("CPLANE_CHAOS_OVERLOAD_S", 8.0 if n < 1000 else 20.0),
            drain_s=_env_num("CPLANE_CHAOS_DRAIN_S", 90.0 if n < 1000 else 120.0),
            seed=int(os.environ.get("CPLANE_CHAOS_SEED", str(int(time.time())))),
            router=os.environ.get("CPLANE_CHAOS_ROUTER", ""),
            out_max_age_s=_env_num("CPLANE_CHAOS_OUT_MAX_AGE_S", 20.0),
            dup_window_s=_env_num("CPLANE_CHAOS_DUP_WINDOW_S", 10.0),
            # 4 %; 1 % in the long runs (80 long generations would hold most of the slots)
            long_share=_env_num("CPLANE_CHAOS_LONG_SHARE", 0.04 if n < 1000 else 0.01),
            long_tokens=_env_range("CPLANE_CHAOS_LONG_TOKENS", (3000, 5500)),
            resubmit=int(_env_num("CPLANE_CHAOS_RESUBMIT", 6)),
            resubmit_wait_s=_env_num("CPLANE_CHAOS_RESUBMIT_WAIT_S", 25.0),
            partitions=not cluster and os.environ.get("CPLANE_CHAOS_PARTITIONS", "1")
            not in ("0", ""),
            tenants=tuple(t.strip() for t in os.environ.get(
                "CPLANE_CHAOS_TENANTS", "acme,globex").split(",") if t.strip()),
            cluster=cluster,
            leader_partitions=tuple(m.strip() for m in os.environ.get(
                "CPLANE_CHAOS_LEADER_PARTITIONS", "").split(",") if m.strip()),
        )

    def router_for(self, replica: int, start: int) -> str:
        """The router of orchestrator `replica` at its `start`-th start (0 = first)."""
        if self.router == "rotate":
            return ROUTER_CHOICES[(replica + start) % len(ROUTER_CHOICES)]
        return self.router or ROUTER_CHOICES[self.seed % len(ROUTER_CHOICES)]

    def worker_ids(self) -> list[str]:
        """Every worker id the run may start, each with its own principal: the first
        `workers`, then the replacements started under a new id (every other kill, one
        every `kill_every_s` while the load runs at `rate`, with a wide margin); past
        these a replacement reuses a dead worker's id (procs.Fleet)."""
        load_s = 60 + 1.5 * self.requests / self.rate
        return [f"w{i}" for i in range(1, self.workers + 1 + int(load_s / self.kill_every_s))]

    def service_env(self) -> dict[str, str]:
        # each service's credentials come from its --creds, never from the harness's env
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("CPLANE")
               and k not in ("NATS_URL", "NATS_CREDS", "NATS_USER", "NATS_PASSWORD")}
        env.update({
            "PYTHONUNBUFFERED": "1",
            "CPLANE_LOG_LEVEL": "INFO",
            "CPLANE__STREAMS__REQ__MAX_MSGS": str(self.req_max_msgs),
            # LLM_OUT keeps chunks seconds, not minutes: a long generation's head ages
            # out while it streams (the books read the harness's archive instead)
            "CPLANE__STREAMS__OUT__MAX_AGE_S": str(self.out_max_age_s),
            # prefix routers hash prompts in blocks this small (the load's common prefixes)
            "CPLANE__ORCHESTRATOR__PREFIX_BLOCK_TOKENS": "32",
        })
        for stream in ("REQ", "WORK", "OUT", "DONE"):
            env[f"CPLANE__STREAMS__{stream}__DUPLICATE_WINDOW_S"] = str(self.dup_window_s)
        if self.leader_partitions:
            env["CPLANE__ORCHESTRATOR__PARTITIONS"] = ",".join(self.leader_partitions)
        if self.cluster:  # every stream and store on min(N, 3) nodes
            env["CPLANE__STREAMS__REPLICAS"] = str(min(3, self.cluster))
        return env
