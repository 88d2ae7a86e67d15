"""Settings: defaults with no file, TOML, environment, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from cplane.schemas.settings import load_settings


def test_defaults_need_no_file() -> None:
    s = load_settings(env={})
    assert s.nats.url == "nats://127.0.0.1:4222"
    assert s.streams.req.name == "LLM_REQ" and s.streams.out.storage == "file"
    assert s.orchestrator.policy == "priority"
    assert s.subjects.request("high", "x") == "llm.req.high.x"


def test_toml_then_env_then_overrides(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[orchestrator]\nmax_batch = 4\npolicy = "fifo"\n[streams.req]\nmax_msgs = 10\n')
    env = {"CPLANE__ORCHESTRATOR__MAX_BATCH": "32", "NATS_URL": "nats://h:1"}
    s = load_settings(f, env=env, worker={"capacity": 3})
    assert s.orchestrator.max_batch == 32  # env beats the file, and is converted
    assert s.orchestrator.policy == "fifo"
    assert s.streams.req.max_msgs == 10 and s.streams.req.name == "LLM_REQ"
    assert s.nats.url == "nats://h:1"
    assert s.worker.capacity == 3


def test_config_file_from_env(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[nats]\nprefix = "prod"\n')
    assert load_settings(env={"CPLANE_CONFIG": str(f)}).subjects.prefix == "prod"


def test_bad_values_name_the_key() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        load_settings(env={"CPLANE__ORCHESTRATOR__MAX_BATCH": "many"})
