"""bench/profile_owners.py: each py-spy sample is charged to the owner of its innermost
Python frame that has one."""

from __future__ import annotations

from pathlib import Path

from bench import profile_owners as po

ROOT = "_run_module_as_main (<frozen runpy>:198);main (cplane/cli.py:536)"


def test_samples_go_to_the_innermost_owned_frame(tmp_path: Path) -> None:
    raw = tmp_path / "p.txt"
    raw.write_text("\n".join([
        f"{ROOT};Client._read_loop (nats/aio/client.py:2414) 7",
        f"{ROOT};Gateway._stream (cplane/gateway/app.py:276) 5",
        # generated code (a dataclass __init__) counts for its caller
        f"{ROOT};pending_of (cplane/orchestrator/pending.py:25);__init__ (<string>:3) 2",
        f"{ROOT};Runner.run (asyncio/runners.py:118) 4",
        f"{ROOT};send (uvicorn/protocols/http/httptools_impl.py:542) 1",
        f"{ROOT};randbytes (random.py:812) 1",
        "py-spy> Stopped sampling because the process exited, no count here",
        "",
    ]))
    got = po.samples(raw)
    assert got == {"nats-py": 7, "cplane": 7, "event loop": 4, "HTTP server": 1,
                   "other libraries": 1}
