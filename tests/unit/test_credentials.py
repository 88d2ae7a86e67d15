"""bus/credentials.py: redacting URLs, the three kinds of credentials file, bad files,
the environment fallbacks, and when TLS is asked for."""

from __future__ import annotations

import json
import os
import ssl
from pathlib import Path

import pytest

from cplane.bus.credentials import (
    CredentialsError,
    cannot_reach,
    connect_options,
    redact,
    tls_context,
)
from cplane.schemas.settings import NatsSettings, load_settings

SEED = "SUAMLK2ZNL35WSMW37E7UD4VZ7ELPKW7DHC3BWBSD2GCZ7IUQQXZIORRBU"  # the NATS docs' example
CREDS = """-----BEGIN NATS USER JWT-----
eyJ0eXAiOiJqd3QiLCJhbGciOiJlZDI1NTE5In0.eyJzdWIiOiJVQUJDIn0.c2ln
------END NATS USER JWT------

************************* IMPORTANT *************************
NKEY Seed printed below can be used to sign and prove identity.

-----BEGIN USER NKEY SEED-----
%s
------END USER NKEY SEED------
""" % SEED


def _file(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text)
    p.chmod(0o600)
    return str(p)


@pytest.mark.parametrize(("url", "shown"), [
    ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
    ("nats://alice:s3cret@127.0.0.1:4222", "nats://alice:***@127.0.0.1:4222"),
    ("tls://alice:p@ss:w@rd@host:4222", "tls://alice:***@host:4222"),
    ("nats://TOKEN123@host:4222", "nats://***@host:4222"),
    ("alice:pw@host:4222", "alice:***@host:4222"),
    ("nats://a:x@h1:4222,nats://h2:4222, nats://b:y@h3:4222",
     "nats://a:***@h1:4222,nats://h2:4222, nats://b:***@h3:4222"),
    ("", ""),
])
def test_redact_hides_passwords_and_tokens(url: str, shown: str) -> None:
    assert redact(url) == shown


def test_cannot_reach_is_one_line_without_the_password() -> None:
    err = cannot_reach("nats://u:hunter2@h:1", OSError("connection refused\nmore"))
    assert str(err) == "cannot reach NATS at nats://u:***@h:1 (OSError: connection refused)"
    assert str(cannot_reach("nats://h:1")) == "cannot reach NATS at nats://h:1"
    err = cannot_reach("nats://u:hunter2@h:1", "bad auth for u:hunter2")
    assert "hunter2" not in str(err) and "u:***" in str(err)


def test_json_user_password_file(tmp_path: Path) -> None:
    path = _file(tmp_path, "auth.json", json.dumps({"user": "cli", "password": "pw1"}))
    opts = connect_options(NatsSettings(creds=path), env={})
    assert opts == {"user": "cli", "password": "pw1"}


def test_nats_creds_file(tmp_path: Path) -> None:
    path = _file(tmp_path, "user.creds", CREDS)
    assert connect_options(NatsSettings(creds=path), env={}) == {"user_credentials": path}


def test_nkey_seed_file(tmp_path: Path) -> None:
    path = _file(tmp_path, "user.nk", SEED + "\n")
    assert connect_options(NatsSettings(creds=path), env={}) == {"nkeys_seed": path}


@pytest.mark.parametrize("text", [
    "not json at all: topsecret",
    json.dumps({"user": "x", "pass": "topsecret"}),  # no "password"
    json.dumps({"user": 1, "password": "topsecret"}),
    json.dumps(["user", "topsecret"]),
    "SUTOPSECRET\n",
    CREDS.split("************************* IMPORTANT")[0] + "topsecret",  # a JWT, no seed
])
def test_invalid_files_name_the_path_never_the_content(tmp_path: Path, text: str) -> None:
    path = _file(tmp_path, "bad", text)
    with pytest.raises(CredentialsError) as info:
        connect_options(NatsSettings(creds=path), env={})
    msg = str(info.value)
    assert path in msg and "\n" not in msg and "topsecret" not in msg.lower()


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match="cannot read it"):
        connect_options(NatsSettings(creds=str(tmp_path / "nope.json")), env={})
    with pytest.raises(CredentialsError, match="not a regular file"):
        connect_options(NatsSettings(creds=str(tmp_path)), env={})
    if os.geteuid() != 0:  # root reads anything
        path = _file(tmp_path, "locked.json", json.dumps({"user": "u", "password": "p"}))
        Path(path).chmod(0)
        with pytest.raises(CredentialsError, match="cannot read it"):
            connect_options(NatsSettings(creds=path), env={})


def test_environment_fallbacks(tmp_path: Path) -> None:
    path = _file(tmp_path, "auth.json", json.dumps({"user": "f", "password": "pf"}))
    assert connect_options(NatsSettings(), env={"NATS_CREDS": path}) == {
        "user": "f", "password": "pf"}
    assert connect_options(NatsSettings(), env={"NATS_USER": "u", "NATS_PASSWORD": "p"}) == {
        "user": "u", "password": "p"}
    other = _file(tmp_path, "other.json", json.dumps({"user": "s", "password": "ps"}))
    # the settings' file comes first, then NATS_CREDS, then NATS_USER
    assert connect_options(NatsSettings(creds=other),
                           env={"NATS_CREDS": path, "NATS_USER": "u"})["user"] == "s"
    assert connect_options(NatsSettings(), env={}) == {}
    # CPLANE__NATS__CREDS reaches the settings like any other key
    assert load_settings(env={"CPLANE__NATS__CREDS": path}).nats.creds == path


def test_tls_is_asked_for_by_a_ca_or_the_scheme(tmp_path: Path) -> None:
    from cplane.bus.tls import make_certs

    certs = make_certs(tmp_path / "tls")
    for f in (certs.ca, certs.server_cert, certs.server_key, certs.client_cert, certs.client_key):
        assert Path(f).stat().st_mode & 0o777 == 0o600
    assert tls_context(NatsSettings()) is None
    ctx = connect_options(NatsSettings(tls_ca=certs.ca), env={})["tls"]
    assert isinstance(ctx, ssl.SSLContext) and ctx.verify_mode == ssl.CERT_REQUIRED
    assert isinstance(tls_context(NatsSettings(url="tls://127.0.0.1:4222")), ssl.SSLContext)
    assert isinstance(tls_context(NatsSettings(tls_ca=certs.ca, tls_cert=certs.client_cert,
                                               tls_key=certs.client_key)), ssl.SSLContext)
    with pytest.raises(CredentialsError, match="TLS CA file"):
        tls_context(NatsSettings(tls_ca=str(tmp_path / "missing.pem")))
    with pytest.raises(CredentialsError, match="client certificate"):
        tls_context(NatsSettings(tls_ca=certs.ca, tls_cert=certs.ca, tls_key=certs.server_key))
    with pytest.raises(CredentialsError, match="without a client certificate"):
        tls_context(NatsSettings(tls_ca=certs.ca, tls_key=certs.client_key))
