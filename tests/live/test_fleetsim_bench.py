"""`cplane bench policies` end to end, as a user runs it (a subprocess)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

from tests import traces

AZURE = traces.find(traces.AZURE)
# The Azure trace when it is there, else the built-in synthetic workload.
SOURCE = ["--trace", str(AZURE)] if AZURE is not None else []


def cplane(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cplane.cli", *args], capture_output=True,
                          text=True, timeout=300, check=False)


def test_bench_policies_writes_table_json_and_plots(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "out"
    r = cplane("bench", "policies", *SOURCE, "--requests", "400", "--workers", "2",
               "--policies", "fifo,priority", "--routers", "round_robin,random,least_loaded",
               "--sweep-requests", "200", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "least_loaded" in r.stdout and "events/s" in r.stdout
    data = json.loads((out / "results.json").read_text())
    assert data["workload"]["count"] == 400
    combos = {(x["policy"], x["router"]) for x in data["results"]}
    assert combos == {(p, q) for p in ("fifo", "priority")
                      for q in ("round_robin", "random", "least_loaded")}
    for x in data["results"]:
        s = x["summary"]
        assert s["completed"] == 400 and 0 < s["median_ttft_ms"] < s["median_e2el_ms"]
        assert 0.0 <= s["attainment"] <= 1.0 and s["median_tpot_ms"] > 0
        assert x["goodput"]["rate"] > 0 and len(x["goodput_sweep"]) >= 3
    for png in ("goodput.png", "ttft_cdf.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_policies_refuses_unknown_names_in_one_line(tmp_path: pathlib.Path) -> None:
    r = cplane("bench", "policies", *SOURCE, "--routers", "least_laoded",
               "--out", str(tmp_path))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "least_loaded" in r.stderr
    r = cplane("bench", "policies", "--trace", str(tmp_path / "nope.csv"), "--out", str(tmp_path))
    assert r.returncode == 2 and "nope.csv" in r.stderr
