"""Write deploy/nats/accounts.conf from cplane.bus.accounts (its one source of truth).

The shipped file is this script's output with the defaults; a unit test
(tests/unit/test_accounts_render.py) fails when the two differ, so the file is
never edited by hand: change bus/accounts.py or the arguments here, and run

    .venv/bin/python deploy/nats/render_accounts.py                   # the shipped file
    .venv/bin/python deploy/nats/render_accounts.py --tenant acme --tenant beta \\
        --worker gpu0 --worker gpu1 -o /etc/nats/accounts.conf       # your fleet's
    .venv/bin/python deploy/nats/render_accounts.py --check           # exit 1 if stale

Principals: `orchestrator`, `operator`, `gateway`, one `worker-<id>` per
`--worker` (default w0..w3) and one `tenant-<name>` per `--tenant` (default a,
b). No password is written: each is `$CPLANE_<NAME>_PASSWORD` (the principal's
name upper-cased, `-` as `_`), which nats-server reads from its environment.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from cplane.bus.accounts import Principal, inbox_prefix, render_accounts

HERE = Path(__file__).resolve().parent
TARGET = HERE / "accounts.conf"
DEFAULT_WORKERS = ("w0", "w1", "w2", "w3")
DEFAULT_TENANTS = ("a", "b")
MAX_FILE, MAX_MEM = "50G", "2G"
_VAR = re.compile(r"[A-Z0-9_]+")


def password_var(name: str) -> str:
    """`$CPLANE_<NAME>_PASSWORD` for principal `name` (upper case, `-` -> `_`)."""
    var = f"CPLANE_{name.upper().replace('-', '_')}_PASSWORD"
    if not _VAR.fullmatch(var):
        raise ValueError(f"principal {name!r}: letters, digits, '_' and '-' only "
                         "(its password is an environment variable)")
    return "$" + var


def principals(workers: Sequence[str] = DEFAULT_WORKERS,
               tenants: Sequence[str] = DEFAULT_TENANTS) -> list[Principal]:
    """The shipped principals; each password is the variable named after it."""
    def p(name: str, role: str, **kw: str) -> Principal:
        return Principal(name, role, password_var(name), **kw)

    ps = [p("orchestrator", "orchestrator"), p("operator", "operator"), p("gateway", "gateway")]
    ps += [p(f"worker-{w}", "worker", worker_id=w) for w in workers]
    ps += [p(f"tenant-{t}", "tenant", tenant=t) for t in tenants]
    seen: dict[str, str] = {}
    for x in ps:  # `a-b` and `a_b` would share one variable
        other = seen.setdefault(x.password, x.name)
        if other != x.name:
            raise ValueError(f"principals {other!r} and {x.name!r} would share {x.password}")
    return ps


def _header(ps: list[Principal]) -> str:
    workers = " ".join(f"--worker {p.worker_id}" for p in ps if p.role == "worker")
    tenants = " ".join(f"--tenant {p.tenant}" for p in ps if p.role == "tenant")
    rows = "\n".join(f"#   {p.name:<22} {p.role:<13} {p.password[1:]}" for p in ps)
    inboxes = "\n".join(f"#   {p.name:<22} {inbox_prefix(p)}" for p in ps
                        if p.role not in ("tenant", "operator"))
    return f"""\
# cplane: the multi-tenant accounts, users and permissions. GENERATED: do not edit.
#
# Written by deploy/nats/render_accounts.py from cplane's bus/accounts.py (the
# same code `cplane up --auth` uses; docs/security.md is the threat model).
# tests/unit/test_accounts_render.py fails when this file differs from the
# script's output. This one was rendered with:
#   {workers}
#   {tenants}
# Regenerate it (after a change to bus/accounts.py, or for your own fleet):
#   .venv/bin/python deploy/nats/render_accounts.py [--worker ID ...] [--tenant NAME ...]
#
# An include fragment: uncomment `include ./accounts.conf` in single.conf (or
# `include ../accounts.conf` in each cluster node's file). Subjects, stream and
# bucket names are cplane's defaults (nats.prefix = "llm", LLM_* streams, KV
# llm_*): render again if cplane.toml changes them. Account CPLANE's JetStream
# limits ({MAX_MEM} memory, {MAX_FILE} file) must not exceed the server's
# max_memory_store / max_file_store, or JetStream does not start.
#
# Passwords are not in this file: each `$CPLANE_<NAME>_PASSWORD` below is read
# from the server's environment when it starts, and the server refuses to
# start when one is missing (fail closed: no principal without a password).
#   export CPLANE_ORCHESTRATOR_PASSWORD=$(openssl rand -hex 24)   # ... one each
#   nats-server -c deploy/nats/single.conf
#
# Principals (user, role, password variable):
{rows}
#
# Give each cplane process its user in a 0600 JSON file, `--creds FILE` (never
# the password on a command line). System users answer on inboxes of their
# own, so their file names the prefix (`cplane up --auth` writes the same):
#   {{"user": "worker-w0", "password": "...", "inbox_prefix": "_INBOX_worker-w0"}}
{inboxes}
# Tenants and the operator use plain `_INBOX`: {{"user": "tenant-a", "password": "..."}}.
#
# The accounts:
# - CPLANE holds JetStream and every stream and bucket. The orchestrator
#   provisions them; a worker may heartbeat, fin and publish KV events only as
#   its own id (llm.hb.<id>, llm.fin.<id>, llm.kv.<id>); the gateway publishes
#   requests for tenants (llm.req.<tenant>.>) and uses the batch stores but may
#   not create, update, purge or delete streams; the operator may do anything.
# - T_<tenant> (one per tenant) has no JetStream. Its `llm.req.<prio>.<slo>`
#   arrives in CPLANE as `llm.req.<tenant>.<prio>.<slo>`, `llm.cancel.<id>` as
#   `llm.cancel.<tenant>.<id>`; it reads `llm.out.<group>.<id>` /
#   `llm.done.<group>.<id>` (CPLANE's `llm.out.<tenant>.>` / `llm.done.<tenant>.>`)
#   and may direct-get its own stored terminals from LLM_DONE. Nothing else of
#   CPLANE or of another tenant reaches it, and nothing it publishes reaches
#   CPLANE except through those imports.
#
# Add a tenant or a worker: render again with every --tenant / --worker you run
# (the defaults are only an example), export its password variable for the
# server, and reload it (`nats-server --signal reload`, or restart); give the
# worker `--worker-id ID --creds` with user `worker-ID`, the tenant its user.
"""


def render(workers: Sequence[str] = DEFAULT_WORKERS,
           tenants: Sequence[str] = DEFAULT_TENANTS) -> str:
    """The whole file: the header, then bus/accounts.py's `accounts { ... }` block."""
    ps = principals(workers, tenants)
    # JetStream limits of account CPLANE: at most the server's own (single.conf and the
    # cluster nodes: max_memory_store 2GB, max_file_store 50GB), or JetStream fails to
    # start ("insufficient storage resources").
    return _header(ps) + "\n" + render_accounts(ps, max_file=MAX_FILE, max_mem=MAX_MEM)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="append", metavar="ID",
                    help="a worker id (repeat; default: w0 w1 w2 w3)")
    ap.add_argument("--tenant", action="append", metavar="NAME",
                    help="a tenant (repeat; default: a b)")
    ap.add_argument("-o", "--output", type=Path, default=TARGET,
                    help="where to write it (default: deploy/nats/accounts.conf; - for stdout)")
    ap.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 when the output file differs")
    args = ap.parse_args(argv)
    try:
        text = render(args.worker or DEFAULT_WORKERS, args.tenant or DEFAULT_TENANTS)
    except ValueError as exc:
        ap.error(str(exc))
    if str(args.output) == "-":
        sys.stdout.write(text)
        return 0
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is stale: run deploy/nats/render_accounts.py", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
