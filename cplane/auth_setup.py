"""`cplane up --auth`: every principal's credentials, and the server's accounts.

One user per process (the orchestrator, each worker under its id, the
gateway), an operator for the CLI, and one per `--tenant`, each with a fresh
password written to `<dir>/<name>.json` (mode 0600, the form `--creds`
reads). Tenants also get a gateway API key. The accounts block comes from
bus/accounts.py (docs/security.md).
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cplane.bus.accounts import Principal, inbox_prefix, new_password, render_accounts
from cplane.schemas.settings import Settings


@dataclass(slots=True)
class AuthSetup:
    directory: str
    principals: list[Principal]
    files: dict[str, str] = field(default_factory=dict)  # principal name -> creds file
    api_keys: dict[str, str] = field(default_factory=dict)  # gateway API key -> tenant

    @classmethod
    def create(cls, worker_ids: list[str], tenants: list[str], gateway: bool,
               directory: str | None = None) -> AuthSetup:
        ps = [Principal("orchestrator", "orchestrator", new_password()),
              Principal("operator", "operator", new_password())]
        if gateway:
            ps.append(Principal("gateway", "gateway", new_password()))
        ps += [Principal(f"worker-{w}", "worker", new_password(), worker_id=w)
               for w in worker_ids]
        ps += [Principal(f"tenant-{t}", "tenant", new_password(), tenant=t)
               for t in dict.fromkeys(tenants)]
        d = directory or tempfile.mkdtemp(prefix="cplane-auth-")
        os.chmod(d, 0o700)
        setup = cls(d, ps)
        for p in ps:
            setup.files[p.name] = setup._write(p)
        # Lower-case hex: keys travel as settings names (CPLANE__GATEWAY__API_KEYS__<key>).
        setup.api_keys = {secrets.token_hex(24): p.tenant for p in ps
                          if p.role == "tenant" and p.tenant}
        return setup

    def _write(self, p: Principal) -> str:
        data: dict[str, str] = {"user": p.name, "password": p.password}
        if p.role not in ("tenant", "operator"):  # system processes answer on own inboxes
            data["inbox_prefix"] = inbox_prefix(p)
        path = Path(self.directory) / f"{p.name}.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh)
        return str(path)

    def config(self, settings: Settings) -> str:
        return render_accounts(self.principals, settings.subjects, settings.streams,
                               partitions=settings.orchestrator.partitions)

    def creds(self, name: str) -> str:
        return self.files[name]

    def login(self, name: str) -> dict[str, str]:
        """`nats.connect` keywords of one principal (`user`, `password`)."""
        p = next(p for p in self.principals if p.name == name)
        return {"user": p.name, "password": p.password}

    def gateway_env(self) -> dict[str, str]:
        return {f"CPLANE__GATEWAY__API_KEYS__{k}": t for k, t in self.api_keys.items()}

    def describe(self, url: str) -> list[dict[str, Any]]:
        """One record per principal: how it connects (`cplane up --auth --json`)."""
        keys = {t: k for k, t in self.api_keys.items()}
        out = []
        for p in self.principals:
            rec: dict[str, Any] = {"principal": p.name, "role": p.role, "tenant": p.tenant,
                                   "url": url, "user": p.name, "password": p.password,
                                   "file": self.files[p.name]}
            if p.tenant in keys:
                rec["api_key"] = keys[p.tenant]
            out.append(rec)
        return out
