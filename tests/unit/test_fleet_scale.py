"""bench/fleet_scale.py: its pure parts (the bar, the work reference, the tables)."""

from __future__ import annotations

from pathlib import Path

import orjson

from bench import fleet_scale as fs
from cplane.fleetsim.records import TraceRequest


def _row(hit: float | None, work: float | None, router: str = "prefix_aware",
         workers: int = 8) -> dict[str, object]:
    return {"workload": "w", "workers": workers, "router": router, "prefix_hit": hit,
            "bound": 0.5 if hit is not None else None, "hit_of_bound": hit,
            "work_max_mean": work, "attainment": 0.9, "ttft_p90_ms": 100.0,
            "ttft_p99_ms": 2000.0, "unfinished": 0}


def test_meets_bar() -> None:
    assert fs.meets_bar(_row(0.9, 1.1)) is True
    assert fs.meets_bar(_row(0.89, 1.0)) is False
    assert fs.meets_bar(_row(0.95, 1.11)) is False
    assert fs.meets_bar(_row(None, 1.0)) is None  # a trace without prefix ids


def test_greedy_work() -> None:
    same = [TraceRequest(f"r{i}", float(i), 90, 10) for i in range(8)]
    assert fs.greedy_work(same, 4) == 1.0
    one_big = [TraceRequest("a", 0.0, 900, 100), TraceRequest("b", 1.0, 90, 10)]
    assert fs.greedy_work(one_big, 2) == 1000 / 550


def test_dispatch_rates(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_bytes(orjson.dumps({"runs": [{"replicas": 2, "req_per_s": 3000.0, "x": 1},
                                            {"replicas": 1, "req_per_s": 2000.0}]}))
    runs = fs.dispatch_rates(str(path))
    assert runs == [{"replicas": 1, "req_per_s": 2000.0}, {"replicas": 2, "req_per_s": 3000.0}]
    assert "| 2 | 3,000 | 1.50x |" in fs.dispatch_lines(runs)
    path.write_bytes(orjson.dumps([{"replicas": 4, "dispatch_rps": 5000.0}]))  # its bare rows
    assert fs.dispatch_rates(str(path)) == [{"replicas": 4, "req_per_s": 5000.0}]
    assert fs.dispatch_rates(None) is None
    assert "--dispatch-json" in fs.dispatch_lines(None)[0]


def test_markdown() -> None:
    rows = [_row(0.95, 1.05), _row(0.3, 1.0, "round_robin"), _row(0.8, 1.2, workers=64)]
    report = {"quick": True, "command": "python bench/fleet_scale.py --quick",
              "settings": fs.QUICK, "cost_workers": [8, 64], "quality_workers": [8, 64],
              "decision_cost": [{"router": "pool", "workers": 8, "us_per_request": 2.0},
                                {"router": "pool", "workers": 64, "us_per_request": 4.0}],
              "quality": rows,
              "workloads": [{"workload": "w", "workers": n, "requests": 100, "rate_per_s": 1.0,
                             "prompt_mean": 1000.0, "block_reuse": 0.5, "greedy_work": 1.01}
                            for n in (8, 64)],
              "dispatch": None}
    text = fs.markdown(report)
    assert "| pool | 2.0 | 4.0 | 2.0x |" in text
    assert "holds on 1 of 2" in text
    assert "| w | prefix_aware | 0.950 | 0.500 | 0.95 | 1.05 |" in text
    assert "| **no** |" in text  # 64 workers: 0.8 of the bound
