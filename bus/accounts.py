"""The multi-tenant server configuration: one account per tenant, the system in its own.

`render_accounts` writes the `accounts { ... }` block of a nats-server
configuration from a list of principals (docs/security.md is the threat
model; `cplane up --auth` and the shipped deploy/nats/accounts.conf come
from here). Pure.

- `CPLANE` holds JetStream and every stream. Its users are the system's
  principals, each with the subjects its role uses and no more:
  orchestrators, workers (one user each: a worker publishes heartbeats,
  fins and KV events only under its own id), the gateway (acting for API
  keys) and operators.
- Each tenant has an account of its own with no JetStream. It sees only
  what it imports: its requests and cancels go in (service imports that put
  its name into the subject: `llm.req.<priority>.<slo>` arrives as
  `llm.req.<tenant>.<priority>.<slo>`), its outputs come out
  (`llm.out.<tenant>.<group>.<id>` reads as `llm.out.<group>.<id>`), and it
  may direct-get its own stored terminals from LLM_DONE. Its `_INBOX.>` and
  every other subject are its own account's: nothing of another tenant or of
  the system reaches it, whatever it subscribes to, and nothing it publishes
  reaches the system except through those imports.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cplane.schemas.messages import PRIORITIES
from cplane.schemas.settings import StreamsSettings
from cplane.schemas.subjects import POOL_MARKER, Subjects, partition_token, valid_token

ROLES = ("tenant", "operator", "worker", "orchestrator", "gateway")
_PRIORITY_NAMES = frozenset(p.value for p in PRIORITIES)
SYSTEM_ACCOUNT = "CPLANE"


@dataclass(frozen=True, slots=True)
class Principal:
    """One user of the server. `tenant`: the tenant (role tenant); `worker_id`: the
    worker it runs as (role worker)."""

    name: str
    role: str
    password: str
    tenant: str | None = None
    worker_id: str | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}: one of {ROLES}")
        if self.role == "tenant" and not (self.tenant and _name_ok(self.tenant)):
            raise ValueError(f"tenant name {self.tenant!r}: letters, digits, '_' and '-' only")
        if self.role == "tenant" and self.tenant in _PRIORITY_NAMES:
            raise ValueError(f"tenant name {self.tenant!r} is a priority name: its subjects "
                             "would read as the system's")
        if self.role == "worker" and not (self.worker_id and valid_token(self.worker_id)):
            raise ValueError(f"worker id {self.worker_id!r} is not a subject token")


def _name_ok(name: str) -> bool:
    return 0 < len(name) <= 64 and all(c.isalnum() or c in "_-" for c in name)


def new_password() -> str:
    return secrets.token_urlsafe(24)


def account_of(p: Principal) -> str:
    return f"T_{p.tenant}" if p.role == "tenant" else SYSTEM_ACCOUNT


def _q(items: Iterable[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def _secret(password: str) -> str:
    """A literal password, quoted; `$NAME` stays a variable the server reads from its
    environment at start (the shipped deploy/nats/accounts.conf: no secret in the file)."""
    return password if password.startswith("$") else json.dumps(password)


def _user(p: Principal, publish: list[str], subscribe: list[str],
          deny_publish: list[str] | None = None, deny_subscribe: list[str] | None = None) -> str:
    pub = f"allow: {_q(publish)}" + (f", deny: {_q(deny_publish)}" if deny_publish else "")
    sub = f"allow: {_q(subscribe)}" + (f", deny: {_q(deny_subscribe)}" if deny_subscribe
                                        else "")
    # allow_responses: it may answer the requests it receives, on the asker's inbox
    return (f"      {{ user: {json.dumps(p.name)}, password: {_secret(p.password)},\n"
            f"        permissions: {{ publish: {{ {pub} }},\n"
            f"                       subscribe: {{ {sub} }},\n"
            f"                       allow_responses: true }} }}")


def _inbox(p: Principal) -> str:
    """Each system user answers on inboxes of its own (credentials carry the prefix):
    one principal cannot read another's replies."""
    return f"_INBOX_{p.name}.>"


def inbox_prefix(p: Principal) -> str:
    return _inbox(p)[:-2]


# A request's reply_to (limits.reply_to_prefixes: `_INBOX.`): the orchestrator and
# workers answer there too. Tenants may not set one; the system's own users answer
# on `_INBOX_<user>.`, which no reply_to can name.
_REPLY_TO = "_INBOX.>"


def _system_user(p: Principal, s: Subjects, st: StreamsSettings, partitioned: bool = False
                 ) -> str:
    pre, ib = s.prefix, _inbox(p)
    never = [f"$JS.API.STREAM.DELETE.{x}" for x in _streams(s, st)]
    if p.role == "orchestrator":
        # partitioned leadership: a request is forwarded to its model's pool subject
        forward = ([f"{pre}.req.{POOL_MARKER}.>", f"{pre}.req.*.{POOL_MARKER}.>"]
                   if partitioned else [])
        return _user(p, [*forward,
            "$JS.API.>", f"$JS.ACK.{st.req.name}.>", f"$JS.ACK.{st.work.name}.>", "$JS.FC.>",
            f"$KV.{s.leases_bucket}.>", f"$KV.{s.config_bucket}.>", f"{pre}.work.>",
            # llm.done: a stored terminal sent again to a later copy of its request
            # (bus/outcome.py send_again); never a reader's only copy of it
            f"{pre}.s.done.>", f"{pre}.done.>", f"{pre}.dlq.>", f"{pre}.admin.heartbeat",
            f"{pre}.fin.*", f"{pre}.admin.kv.*", ib, _REPLY_TO,
        ], [ib, f"{pre}.hb.*", f"{pre}.fin.*", f"{pre}.cancel.>", f"{pre}.kv.*",
            f"{pre}.admin.policy", f"{pre}.admin.router", f"{pre}.admin.breakers",
            f"{pre}.admin.status", f"{pre}.admin.metrics", f"{pre}.admin.instances",
            f"{pre}.admin.request"],
            [*never, *(f"$JS.API.STREAM.PURGE.{x}" for x in _streams(s, st))])
    if p.role == "worker":
        w, work = p.worker_id, st.work.name
        return _user(p, [
            "$JS.API.INFO", "$JS.API.STREAM.INFO.*", "$JS.API.STREAM.MSG.GET.*",
            "$JS.API.DIRECT.GET.>", f"$JS.API.CONSUMER.CREATE.{work}",
            f"$JS.API.CONSUMER.CREATE.{work}.>", f"$JS.API.CONSUMER.DURABLE.CREATE.{work}.>",
            f"$JS.API.CONSUMER.INFO.{work}.>", f"$JS.API.CONSUMER.DELETE.{work}.>",
            f"$JS.API.CONSUMER.MSG.NEXT.{work}.>",
            f"$JS.API.CONSUMER.CREATE.{st.cancel.name}",
            f"$JS.API.CONSUMER.CREATE.{st.cancel.name}.>",
            f"$JS.API.CONSUMER.DELETE.{st.cancel.name}.>",
            f"$JS.ACK.{work}.>", "$JS.FC.>", f"$KV.{s.prefix}_claims.>",
            f"{pre}.s.out.>", f"{pre}.s.done.>", f"{pre}.sf.>", f"{pre}.done.>", f"{pre}.work.>",
            f"{pre}.dlq.>", f"{pre}.hb.{w}", f"{pre}.fin.{w}", f"{pre}.kv.{w}", ib, _REPLY_TO,
        ], [ib, f"{pre}.cancel.>", f"{pre}.admin.heartbeat", f"{pre}.hb.*",
            f"{pre}.admin.kv.{w}", f"{pre}.admin.metrics", f"{pre}.admin.instance.{w}",
            f"{pre}.admin.request"])
    if p.role == "gateway":
        return _user(p, [
            *_gateway_api(s, st), f"$JS.ACK.{st.done.name}.>", "$JS.FC.>", f"{pre}.req.>",
            f"{pre}.cancel.>", f"{pre}.admin.heartbeat", f"$KV.{s.batch_jobs_bucket}.>",
            f"$O.{s.batch_files_bucket}.>", ib,
        ], [ib, f"{pre}.*.>"],  # its SDK reads `llm.*.<group>.<id>` (chunks and terminal)
            deny_subscribe=[f"{pre}.{k}.>" for k in ("req", "s", "work", "dlq", "cancel",
                                                      "admin", "kv", "fin")])
    # operator: the whole system account (it is the administrator), on its own inboxes
    return f"      {{ user: {json.dumps(p.name)}, password: {_secret(p.password)} }}"


def _gateway_api(s: Subjects, st: StreamsSettings) -> list[str]:
    """The JetStream API the gateway uses: the batch stores (KV and object store), its
    collectors' consumers on LLM_DONE, and the SDK's reads of LLM_OUT / LLM_DONE. No
    stream create, update, delete or purge but the object store's own chunk purges."""
    obj, kv = f"OBJ_{s.batch_files_bucket}", f"KV_{s.batch_jobs_bucket}"
    readable = (st.done.name, st.out.name, kv, obj)
    return ["$JS.API.INFO", "$JS.API.STREAM.NAMES", "$JS.API.STREAM.INFO.*",
            *(f"$JS.API.STREAM.MSG.GET.{x}" for x in readable),
            "$JS.API.DIRECT.GET.>", f"$JS.API.STREAM.PURGE.{obj}",
            f"$JS.API.CONSUMER.DURABLE.CREATE.{st.done.name}.>",
            f"$JS.API.CONSUMER.MSG.NEXT.{st.done.name}.>",
            *(f"$JS.API.CONSUMER.{verb}.{x}{tail}" for x in readable
              for verb, tail in (("CREATE", ""), ("CREATE", ".>"), ("INFO", ".>"),
                                 ("DELETE", ".>")))]


def _streams(s: Subjects, st: StreamsSettings) -> list[str]:
    return [st.req.name, st.work.name, st.out.name, st.done.name, st.cancel.name,
            st.dlq.name, f"KV_{s.leases_bucket}", f"KV_{s.config_bucket}",
            f"KV_{s.prefix}_claims", f"KV_{s.batch_jobs_bucket}", f"OBJ_{s.batch_files_bucket}"]


def _tenant_mappings(t: str, s: Subjects, st: StreamsSettings,
                     pools: Sequence[str] = ()) -> list[tuple[str, str, str]]:
    """What tenant `t` shares with the system: (kind, the system's subject, the same as
    the tenant reads it). Exported to `T_<t>` alone, imported there mapped. `pools`:
    the partitions' pool tokens a tenant may address (docs/replicas.md)."""
    pre = s.prefix
    return [
        # exactly `<priority>.<slo>`: any other shape maps to nothing (never to a
        # subject of the system's own, as `llm.req.x` -> `llm.req.<t>.x` would)
        ("service", f"{pre}.req.{t}.*.*", f"{pre}.req.*.*"),
        # one configured pool's `pool.<pool>.<priority>.<slo>`, no other
        *(("service", f"{pre}.req.{t}.{POOL_MARKER}.{pool}.*.*",
           f"{pre}.req.{POOL_MARKER}.{pool}.*.*") for pool in pools),
        ("service", f"{pre}.cancel.{t}.>", f"{pre}.cancel.>"),
        ("stream", f"{pre}.out.{t}.>", f"{pre}.out.>"),
        ("stream", f"{pre}.done.{t}.>", f"{pre}.done.>"),
        # its own stored terminals, last by subject: in LLM_OUT at once, LLM_DONE for days
        *(("service", f"$JS.API.DIRECT.GET.{x}.{pre}.s.done.{t}.>",
           f"$JS.API.DIRECT.GET.{x}.{pre}.s.done.>") for x in (st.out.name, st.done.name)),
    ]


def _tenant_exports(t: str, s: Subjects, st: StreamsSettings, pools: Sequence[str]
                    ) -> list[str]:
    return [f'      {{ {kind}: "{system}", accounts: [T_{t}] }}'
            for kind, system, _ in _tenant_mappings(t, s, st, pools)]


def _tenant_account(t: str, users: list[Principal], s: Subjects, st: StreamsSettings,
                    pools: Sequence[str]) -> str:
    pre = s.prefix
    imports = [f'{{ {kind}: {{ account: {SYSTEM_ACCOUNT}, subject: "{system}" }}, to: "{own}" }}'
               for kind, system, own in _tenant_mappings(t, s, st, pools)]
    gets = [f"$JS.API.DIRECT.GET.{x}.>" for x in (st.out.name, st.done.name)]
    body = ",\n".join(_user(u, [f"{pre}.req.>", f"{pre}.cancel.>", *gets, "$JS.API.INFO",
                                "_INBOX.>"],
                            [">"]) for u in users)  # its own account holds only its own
    return (f"  T_{t} {{\n    users: [\n{body}\n    ]\n    imports: [\n      "
            + ",\n      ".join(imports) + "\n    ]\n  }\n")


def render_accounts(principals: list[Principal], subjects: Subjects | None = None,
                    streams: StreamsSettings | None = None, *, max_file: str = "50G",
                    max_mem: str = "2G", partitions: Sequence[str] = ()) -> str:
    """The `accounts { ... }` block (and `no_auth_user`-free: every client authenticates).
    `partitions`: the models with a pool of their own (`orchestrator.partitions`),
    whose pool subjects tenants may publish to."""
    s, st = subjects or Subjects(), streams or StreamsSettings()
    pools = [partition_token(p) for p in partitions]
    names = [p.name for p in principals]
    if len(set(names)) != len(names):
        raise ValueError("principal names must be unique")
    tenants: dict[str, list[Principal]] = {}
    for p in principals:
        if p.role == "tenant":
            assert p.tenant is not None
            tenants.setdefault(p.tenant, []).append(p)
    system = [p for p in principals if p.role != "tenant"]
    exports = [e for t in sorted(tenants) for e in _tenant_exports(t, s, st, pools)]
    out = ["accounts {", f"  {SYSTEM_ACCOUNT} {{",
           f"    jetstream: {{ max_mem: {max_mem}, max_file: {max_file} }}",
           "    users: [", ",\n".join(_system_user(p, s, st, bool(pools)) for p in system),
           "    ]"]
    if exports:
        out += ["    exports: [", ",\n".join(exports), "    ]"]
    out.append("  }")
    out += [_tenant_account(t, users, s, st, pools) for t, users in sorted(tenants.items())]
    out.append("}")
    return "\n".join(out) + "\n"


__all__ = ["ROLES", "SYSTEM_ACCOUNT", "Principal", "account_of", "inbox_prefix", "new_password",
           "render_accounts"]
