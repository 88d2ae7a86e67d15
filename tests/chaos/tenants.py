"""Who is who in a chaos run: every process on its own credentials, and the tenant spies.

The run's broker runs the multi-tenant configuration (bus/accounts.py through
cplane/auth_setup.py `AuthSetup`): account CPLANE holds JetStream and the
system's users, each tenant has an account `T_<tenant>` of its own. Who
connects as whom:

- the orchestrators: the `orchestrator` principal;
- each worker: `worker-<id>`, one principal per worker id. Ids are known up
  front (`worker_ids`: the first ones, then a pool for the replacements a
  run starts under new ids; past the pool a replacement takes the id of a
  worker that is dead: procs.Fleet);
- the load (load.py): the tenants `tenant-<name>`, requests split between them,
  each published in its own account on `llm.req.<priority>.<slo>` (the server
  maps it to `llm.req.<tenant>.<priority>.<slo>` in CPLANE; the PubAck comes
  back the same way); a resubmission goes through the id's own tenant;
- the recorder, the books and the fault lanes' look-ups: the `operator`
  (the whole of CPLANE: tenants' outputs on `llm.out.<tenant>.<group>.<id>`).

A spy (`TenantSpy`) subscribes to `>` on each tenant account for the whole
run, on a connection of its own: it gets everything that account can get
(its outputs, its own publishes and PubAcks). A message that names another
tenant (a subject token that is another tenant's name, or another tenant's
request id in its subject, headers or body: ids carry their tenant, load.py)
is a leak; the figures line counts them (`leaks=`, must be 0).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from nats.aio.msg import Msg

from cplane.auth_setup import AuthSetup
from cplane.schemas.settings import load_settings

OPERATOR = "operator"
ORCHESTRATOR = "orchestrator"


def tenant_marker(tenant: str) -> str:
    """What every request id of `tenant` holds (load.py: `cx<tag>-<tenant>-<n>`)."""
    return f"-{tenant}-"


def worker_principal(worker_id: str) -> str:
    return f"worker-{worker_id}"


def tenant_principal(tenant: str) -> str:
    return f"tenant-{tenant}"


class ChaosAuth:
    """The run's principals, their credential files (`<run dir>/creds`, 0600) and the
    broker's accounts block."""

    def __init__(self, run_dir: Path, worker_ids: list[str], tenants: tuple[str, ...],
                 partitions: tuple[str, ...] = ()) -> None:
        if len(tenants) < 2:
            raise ValueError(f"the chaos run needs at least two tenants, not {tenants}")
        creds = run_dir / "creds"
        creds.mkdir(mode=0o700, exist_ok=True)
        self.tenants = tenants
        self.worker_ids = list(worker_ids)
        self.setup = AuthSetup.create(self.worker_ids, list(tenants), gateway=False,
                                      directory=str(creds))
        # stream and subject names only: the run's services change sizes, not names;
        # partitioned leadership: tenants may publish to the partitions' pool subjects
        self.accounts = self.setup.config(load_settings(
            env={}, orchestrator={"partitions": list(partitions)}))

    def creds(self, principal: str) -> str:
        return self.setup.creds(principal)

    def worker_creds(self, worker_id: str) -> str:
        return self.creds(worker_principal(worker_id))

    def tenant_creds(self, tenant: str) -> str:
        return self.creds(tenant_principal(tenant))


class TenantSpy:
    """Everything one tenant account receives (a `>` subscription on it), checked for
    what names another tenant."""

    def __init__(self, tenant: str, tenants: tuple[str, ...]) -> None:
        self.tenant = tenant
        others = [t for t in tenants if t != tenant]
        self.others = frozenset(others)
        self.own = tenant_marker(tenant).encode()
        self.markers = [(t, tenant_marker(t).encode()) for t in others]
        self.total = 0
        self.kinds: Counter[str] = Counter()  # first two subject tokens -> messages
        self.own_outputs: Counter[str] = Counter()  # out / done of its own request ids
        self.leaks = 0
        self.leak_from: Counter[str] = Counter()  # the other tenant named -> messages
        self.samples: list[str] = []

    def _named(self, msg: Msg) -> str | None:
        """The other tenant a message names, if any."""
        tokens = msg.subject.split(".")
        for t in tokens:
            if t in self.others:
                return t
        subject = msg.subject.encode()
        headers = " ".join(f"{k}:{v}" for k, v in (msg.headers or {}).items()).encode()
        for t, marker in self.markers:
            if marker in subject or marker in msg.data or marker in headers:
                return t
        return None

    async def on_msg(self, msg: Msg) -> None:
        self.total += 1
        subject = msg.subject
        first = subject.split(".", 2)
        self.kinds["_INBOX" if first[0] == "_INBOX" else ".".join(first[:2])] += 1
        other = self._named(msg)
        if other is not None:
            self.leaks += 1
            self.leak_from[other] += 1
            if len(self.samples) < 8:
                self.samples.append(f"{subject} headers={dict(msg.headers or {})} "
                                    f"{msg.data[:160]!r}")
            return
        if subject.startswith(("llm.out.", "llm.done.")) and self.own in subject.encode():
            self.own_outputs[subject.split(".")[1]] += 1

    def line(self) -> str:
        return (f"spy on T_{self.tenant} ('>'): {self.total} messages "
                f"{dict(self.kinds.most_common(8))}; own outputs {dict(self.own_outputs)}; "
                f"naming another tenant: {self.leaks} {dict(self.leak_from)}"
                + (f" samples {self.samples}" if self.samples else ""))


_CLIENT = re.compile(r" - cid:\d+ - (?P<rest>.*)$")
# Refused by design: a worker that finds a stream missing tries to create it and, not
# allowed to, waits for an orchestrator to (bus/streams_ready.py).
EXPECTED_REFUSALS = re.compile(
    r'"CPLANE/user:worker-[^"]+" - Publish Violation - Subject "\$JS\.API\.STREAM\.CREATE\.\w+"')
_RID = re.compile(r"cx\d+-[A-Za-z0-9_-]+?-\d{6}")


def permission_violations(log: Path) -> tuple[Counter[str], Counter[str]]:
    """The broker's refusals (`Publish Violation`, `Subscription Violation`, older
    servers' `Permissions Violation`) in its log, by client, user and subject (time,
    address and client id left out, request ids as `<id>`): (unexpected ones: an
    action of a role that its permissions lack; the ones refused by design,
    EXPECTED_REFUSALS). Both empty when the log cannot be read."""
    found: Counter[str] = Counter()
    expected: Counter[str] = Counter()
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return found, expected
    for line in text.splitlines():
        if "Violation" not in line:
            continue
        m = _CLIENT.search(line)
        what = _RID.sub("<id>", m["rest"] if m else line.strip())[:300]
        (expected if EXPECTED_REFUSALS.search(what) else found)[what] += 1
    return found, expected
