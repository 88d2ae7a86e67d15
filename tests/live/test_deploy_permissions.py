"""The shipped NATS permissions (deploy/nats/accounts.conf) against a real server:
every user can do its part of every flow, and the denials hold."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_accounts_conf_lets_each_user_do_its_part_and_no_more() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "deploy/nats/check_permissions.py")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    tail = (out.stdout + out.stderr)[-3000:]
    assert out.returncode == 0, tail
    assert out.stdout.rstrip().endswith("checks, 0 failed"), tail
