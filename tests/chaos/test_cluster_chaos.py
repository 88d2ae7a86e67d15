"""The chaos run on a 3-node JetStream cluster with R3 streams (marker `cluster`).

Separate processes: three nats-servers (cluster.py), two orchestrator replicas
listing different nodes first, three workers and their replacements. While N
requests (`CPLANE_CHAOS_REQUESTS`; 300 here in `make test`, 2,000 in the
acceptance run) at temperature > 0 with every priority are published from two
tenant accounts, it kills -9 the node leading LLM_REQ, then the one leading
LLM_OUT, then the JetStream meta leader (each restarted on its store), stops
one node past its route timeout and later the LLM_REQ leader (SIGSTOP, then
SIGCONT), restarts all three in turn (a rolling upgrade), and kills and pauses
workers and orchestrators as the single-server run does. The same figures line
and zeros as test_chaos.py, plus `node_kills`; report.txt adds the seconds each
fault stalled publishes, first-token latency through the run and each leader
election's duration.

    CPLANE_CHAOS_REQUESTS=2000 pytest tests/chaos -m cluster -s
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from tests.chaos.scenario import ChaosConfig
from tests.chaos.verdict import run_and_check

_N = int(os.environ.get("CPLANE_CHAOS_REQUESTS", "300"))
_TIMEOUT = int(480 + _N * 0.6)

pytestmark = [pytest.mark.chaos, pytest.mark.cluster, pytest.mark.timeout(_TIMEOUT)]


# LLM_OUT keeps chunks and terminals 60 s here, not the single-server run's 20 s: on a
# cluster, LLM_DONE's source (and the harness's archive mirror) lost contact with
# LLM_OUT for up to 17 s after node faults (report.txt, "copies of LLM_OUT"), and what
# ages out of LLM_OUT before it is copied is gone. Heads aging out under long
# generations are the single-server run's (test_chaos.py).
OUT_MAX_AGE_S = float(os.environ.get("CPLANE_CHAOS_OUT_MAX_AGE_S", "60"))


def test_cluster_chaos(chaos_dir: Path) -> None:
    cfg = dataclasses.replace(ChaosConfig.from_env(), cluster=3, partitions=False,
                              out_max_age_s=OUT_MAX_AGE_S)
    run_and_check(cfg, chaos_dir, node_kills=True)
