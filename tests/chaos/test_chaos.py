"""The chaos run: accepted requests under crashes, pauses, partitions and overload end in one terminal.

`CPLANE_CHAOS_REQUESTS` sets N (300 by default: the short run inside `make test`;
the acceptance check runs 2000). The last line printed is the figures line:

    chaos: accepted= refused= completed= errored= lost= dup_terminals= gaps=
           inconsistent= stranded= hung= max_rss_mb= pauses= partitions=
           long_generations= resubmitted= leaks= node_kills= done_missing=

Every process runs on its own credentials against the multi-tenant server
configuration (tenants.py): the load publishes from two tenant accounts, and
`leaks` counts the messages a tenant's account received that name another
tenant (a spy subscribed to `>` on each; must be 0). `done_missing` counts
the terminals LLM_OUT stored that LLM_DONE (its stream source) never got (must
be 0; report.py). The line before the figures line counts the broker's
permission violations.

pauses, partitions, long_generations and resubmitted say what the run injected (faults.py describes every fault);
report.txt in the run dir adds the seconds of unavailability after each fault.

Other knobs (environment): CPLANE_CHAOS_WORKERS, _CAPACITY, _RATE, _REQ_MAX_MSGS,
_KILL_EVERY_S, _PAUSE_EVERY_S, _OVERLOAD_S, _DRAIN_S, _SEED, _ROUTER (least_loaded,
prefix_aware, affinity, pool, any other router, or rotate; unset: picked from the
seed), _OUT_MAX_AGE_S (LLM_OUT's max_age, 20), _DUP_WINDOW_S (the streams'
duplicate windows, 10), _LONG_SHARE (0.04; 0.01 from N=1000), _LONG_TOKENS (3000-5500), _RESUBMIT (6),
_RESUBMIT_WAIT_S (25), _PARTITIONS (0: no proxies), _TENANTS (acme,globex: two or more),
_LEADER_PARTITIONS (models with a leader each; test_chaos_partitioned_leadership: sim),
_CLUSTER (N: an N-node JetStream cluster instead of one server; test_cluster_chaos.py).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from tests.chaos.scenario import ChaosConfig
from tests.chaos.verdict import run_and_check

_N = int(os.environ.get("CPLANE_CHAOS_REQUESTS", "300"))
# start-up + load at ~10 req/s + drain (long generations) + books, with a wide margin
_TIMEOUT = int(420 + _N * 0.5)

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(_TIMEOUT)]

def test_chaos(chaos_dir: Path) -> None:
    run_and_check(ChaosConfig.from_env(), chaos_dir)


def test_chaos_partitioned_leadership(chaos_dir: Path) -> None:
    """The same run with partitioned leadership: the workers' model (`sim`) is a
    partition with a lease of its own beside the default partition's, so the
    replicas lead one each and every orchestrator kill, pause and network partition
    hits a partition's leader; every request names the model, half on its pool's
    subject (through the tenants' mapped imports), half the old way (forwarded by
    the default partition's leader). Same verdict, same figures line."""
    cfg = ChaosConfig.from_env()
    if not cfg.leader_partitions:
        cfg = dataclasses.replace(cfg, leader_partitions=("sim",))
    run_and_check(cfg, chaos_dir)
