"""The multi-tenant accounts (bus/accounts.py) as rendered, and the shipped
deploy/nats/accounts.conf: the committed file is exactly what
deploy/nats/render_accounts.py writes (nobody edits it by hand), and the rendered
block keeps each tenant in its own account, each worker to its own id, and the
whole JetStream API to the principals that need it."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from cplane.bus.accounts import Principal, inbox_prefix, render_accounts

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "nats" / "render_accounts.py"
SHIPPED = ROOT / "deploy" / "nats" / "accounts.conf"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("render_accounts", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


RENDER = _script()


# -- a reader for the configuration's syntax (maps, arrays, strings, bare words) ------
_TOKEN = re.compile(r'\s+|#[^\n]*|//[^\n]*|(?P<p>[{}\[\],:=])|(?P<s>"(?:\\.|[^"\\])*")'
                    r'|(?P<w>[^\s{}\[\],:="#]+)')


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        assert m is not None, f"cannot read {text[pos:pos + 40]!r}"
        pos = m.end()
        if m["p"]:
            out.append(("p", m["p"]))
        elif m["s"]:
            out.append(("s", json.loads(m["s"])))
        elif m["w"]:
            out.append(("w", m["w"]))
    return out


class _Reader:
    def __init__(self, text: str) -> None:
        self.toks = _tokens(text)
        self.i = 0

    def peek(self) -> tuple[str, str] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> tuple[str, str]:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def value(self) -> Any:
        kind, text = self.take()
        if (kind, text) == ("p", "{"):
            return self.members("}")
        if (kind, text) == ("p", "["):
            items = []
            while self.peek() != ("p", "]"):
                items.append(self.value())
                if self.peek() == ("p", ","):
                    self.take()
            self.take()
            return items
        assert kind in ("s", "w"), (kind, text)
        return text if kind == "s" else ("bare", text)

    def members(self, end: str | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        while self.peek() is not None and self.peek() != ("p", end):
            _, key = self.take()
            if self.peek() in (("p", ":"), ("p", "=")):
                self.take()
            out[key] = self.value()
            if self.peek() == ("p", ","):
                self.take()
        if end is not None:
            self.take()
        return out


def parse(text: str) -> dict[str, Any]:
    return _Reader(text).members(None)


def principals(workers: tuple[str, ...] = ("w0", "w1"),
               tenants: tuple[str, ...] = ("a", "b", "acme-1")) -> list[Principal]:
    ps = [Principal("orchestrator", "orchestrator", "o-pw"),
          Principal("operator", "operator", "op-pw"),
          Principal("gateway", "gateway", "g-pw")]
    ps += [Principal(f"worker-{w}", "worker", f"{w}-pw", worker_id=w) for w in workers]
    ps += [Principal(f"tenant-{t}", "tenant", f"{t}-pw", tenant=t) for t in tenants]
    return ps


def accounts(ps: list[Principal] | None = None) -> dict[str, Any]:
    return parse(render_accounts(ps or principals()))["accounts"]


def users(acc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {u["user"]: u for u in acc["users"]}


def pub_allow(u: dict[str, Any]) -> list[str]:
    return list(u["permissions"]["publish"]["allow"])


def sub_allow(u: dict[str, Any]) -> list[str]:
    return list(u["permissions"]["subscribe"]["allow"])


# -- the shipped file -----------------------------------------------------------------------
def test_the_committed_file_is_the_scripts_output() -> None:
    assert SHIPPED.read_text() == RENDER.render(), (
        "deploy/nats/accounts.conf is stale or edited by hand: "
        ".venv/bin/python deploy/nats/render_accounts.py")
    assert RENDER.main(["--check"]) == 0


def test_check_finds_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "accounts.conf"
    stale.write_text(RENDER.render() + "# edited\n")
    assert RENDER.main(["--check", "-o", str(stale)]) == 1
    assert RENDER.main(["-o", str(stale)]) == 0
    assert RENDER.main(["--check", "-o", str(stale)]) == 0


def test_the_shipped_file_names_every_password_as_a_variable() -> None:
    acc = parse(SHIPPED.read_text())["accounts"]
    found = {name: u["password"] for a in acc.values() for name, u in users(a).items()}
    assert set(found) == {"orchestrator", "operator", "gateway", "worker-w0", "worker-w1",
                          "worker-w2", "worker-w3", "tenant-a", "tenant-b"}
    for name, pw in found.items():
        want = "$CPLANE_" + name.upper().replace("-", "_") + "_PASSWORD"
        assert pw == ("bare", want), (name, pw)  # unquoted: the server reads its environment
    assert set(acc) == {"CPLANE", "T_a", "T_b"}
    assert "GENERATED: do not edit" in SHIPPED.read_text().splitlines()[0]


def test_literal_passwords_are_quoted() -> None:
    ps = [Principal("operator", "operator", 'p"w $x'), Principal("o2", "operator", "$ENV_PW")]
    got = users(accounts(ps)["CPLANE"])
    assert got["operator"]["password"] == 'p"w $x'
    assert got["o2"]["password"] == ("bare", "$ENV_PW")


# -- tenants --------------------------------------------------------------------------------
def test_every_tenant_export_is_restricted_to_its_own_account() -> None:
    acc = accounts()
    exports = acc["CPLANE"]["exports"]
    assert len(exports) == 6 * 3  # req, cancel, out, done, direct gets on LLM_OUT and LLM_DONE
    for e in exports:
        subject = e.get("service") or e.get("stream")
        tenant = re.search(r"llm\.(?:req|cancel|out|done|s\.done)\.([^.*>]+)\.(?:>|\*\.\*)$",
                           subject)
        assert tenant is not None, subject
        assert e["accounts"] == [("bare", f"T_{tenant[1]}")], e
    for t in ("a", "b", "acme-1"):
        req = [e for e in exports if e.get("service", "").startswith(f"llm.req.{t}.")]
        assert [e["service"] for e in req] == [f"llm.req.{t}.*.*"]  # <priority>.<slo> only
        for imp in acc[f"T_{t}"]["imports"]:
            src = imp.get("service") or imp.get("stream")
            assert src["account"] == ("bare", "CPLANE"), imp
            assert f".{t}." in src["subject"], imp  # only its own subjects come in
            assert f".{t}." not in imp["to"], imp  # and read without the tenant


def test_no_tenant_account_has_jetstream() -> None:
    acc = accounts()
    assert "jetstream" in acc["CPLANE"]
    tenants = [name for name in acc if name != "CPLANE"]
    assert tenants == ["T_a", "T_acme-1", "T_b"]
    for name in tenants:
        assert "jetstream" not in acc[name], name
        (user,) = acc[name]["users"]
        assert not any(s.startswith(("$JS.API.STREAM", "$JS.API.CONSUMER", "$KV.", "$O."))
                       for s in pub_allow(user)), pub_allow(user)


def test_bad_tenant_names_are_refused() -> None:
    for bad in ("", "a.b", "a b", "*", ">", "a>", "x" * 65, "t\n", None):
        with pytest.raises(ValueError):
            Principal("tenant-x", "tenant", "pw", tenant=bad)
    for priority in ("critical", "high", "normal", "low"):  # would read as the system's
        with pytest.raises(ValueError, match="priority"):
            Principal(f"tenant-{priority}", "tenant", "pw", tenant=priority)
    with pytest.raises(ValueError):
        Principal("x", "admin", "pw")  # not a role
    with pytest.raises(SystemExit):  # the script says so in one line
        RENDER.main(["--tenant", "high", "-o", "-"])
    with pytest.raises(ValueError, match="priority"):
        RENDER.principals(tenants=["normal"])


def test_duplicate_names_are_refused() -> None:
    ps = principals()
    with pytest.raises(ValueError, match="unique"):
        render_accounts([*ps, Principal("worker-w0", "worker", "pw", worker_id="w9")])
    with pytest.raises(ValueError, match="unique"):
        render_accounts([*ps, Principal("tenant-a", "tenant", "pw", tenant="z")])
    with pytest.raises(ValueError, match="share"):  # one password variable for two
        RENDER.principals(workers=["a-b", "a_b"])
    with pytest.raises(ValueError, match="letters"):
        RENDER.principals(workers=["gpu:0"])


# -- workers and the JetStream API ------------------------------------------------------
def test_worker_users_are_pinned_to_their_id() -> None:
    got = users(accounts()["CPLANE"])
    for w in ("w0", "w1"):
        u = got[f"worker-{w}"]
        pub, sub = pub_allow(u), sub_allow(u)
        for kind in ("hb", "fin", "kv"):
            assert [s for s in pub if s.startswith(f"llm.{kind}.")] == [f"llm.{kind}.{w}"]
        assert [s for s in sub if s.startswith("llm.admin.kv.")] == [f"llm.admin.kv.{w}"]
        assert [s for s in sub if s.startswith("llm.admin.instance.")] == [
            f"llm.admin.instance.{w}"]
        assert f"_INBOX_worker-{w}.>" in pub and f"_INBOX_worker-{w}.>" in sub
        assert not any(s.startswith(("$KV.llm_leases", "$KV.llm_config", "$JS.API.STREAM.CREATE",
                                     "$JS.API.STREAM.UPDATE", "$JS.API.STREAM.DELETE",
                                     "$JS.API.STREAM.PURGE", "llm.out.", "llm.req.",
                                     "llm.admin."))
                       for s in pub), pub
        assert not any(s.startswith("_INBOX.") for s in sub), sub  # nobody else's replies


def test_only_the_operator_orchestrator_and_gateway_may_have_the_whole_api() -> None:
    acc = accounts()
    whole = set()
    for a in acc.values():
        for name, u in users(a).items():
            if "permissions" not in u:  # the whole account
                assert name == "operator", name
                whole.add(name)
                continue
            pub = pub_allow(u)
            assert ">" not in pub and "$JS.>" not in pub, name
            if "$JS.API.>" in pub:
                whole.add(name)
    assert {"operator", "orchestrator"} <= whole <= {"operator", "orchestrator", "gateway"}
    got = users(acc["CPLANE"])
    deny = got["orchestrator"]["permissions"]["publish"]["deny"]  # it never deletes a stream
    assert {"$JS.API.STREAM.DELETE.LLM_OUT", "$JS.API.STREAM.DELETE.LLM_REQ"} <= set(deny)
    gw = got["gateway"]["permissions"]["publish"]
    gw_streams = [x for x in gw["allow"] if x.startswith("$JS.API.STREAM.")
                  and x.split(".")[3] in ("CREATE", "UPDATE", "DELETE", "PURGE")]
    assert gw_streams == ["$JS.API.STREAM.PURGE.OBJ_llm_batch_files"] or (
        "$JS.API.>" in gw["allow"] and {"$JS.API.STREAM.CREATE.>", "$JS.API.STREAM.UPDATE.>"}
        <= set(gw.get("deny", []))), gw


def test_system_users_answer_on_inboxes_of_their_own() -> None:
    got = users(accounts()["CPLANE"])
    for p in principals():
        if p.role in ("tenant", "operator"):
            continue
        u, own = got[p.name], inbox_prefix(p) + ".>"
        assert own == f"_INBOX_{p.name}.>"
        assert own in pub_allow(u) and own in sub_allow(u), p.name
        # it may answer a request's reply_to (`_INBOX.`), never read one
        assert not any(s.startswith("_INBOX.") for s in sub_allow(u)), p.name


def test_readers_never_publish_outputs() -> None:
    """Tenants and the gateway read outputs; only the streams' RePublish (and the
    producers: workers, the orchestrator) put anything on llm.out / llm.done / llm.s."""
    acc = accounts()
    readers = [users(acc["CPLANE"])["gateway"]]
    readers += [u for name, a in acc.items() if name != "CPLANE" for u in a["users"]]
    for u in readers:
        bad = [s for s in pub_allow(u) if s.startswith(("llm.out", "llm.done", "llm.s."))]
        assert not bad, (u["user"], bad)
    for name, u in users(acc["CPLANE"]).items():
        if "permissions" in u:  # chunks are stored first: nobody publishes llm.out itself
            assert not [s for s in pub_allow(u) if s.startswith("llm.out")], name
