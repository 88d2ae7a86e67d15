"""Credentials and TLS for every NATS connection, from `NatsSettings`, in one place.

`connect_options(settings.nats)` is what each `nats.connect` of the product
adds to its own options. A password never has to be on a command line (where
`/proc/<pid>/cmdline` shows it): it comes from a credentials file
(`nats.creds`, `--creds FILE`, `CPLANE__NATS__CREDS`, `NATS_CREDS`) or from
`NATS_USER` / `NATS_PASSWORD`. Three kinds of file are understood:

- a NATS `.creds` file (a user JWT and its nkey seed, `nsc generate creds`);
- an nkey seed file (one line, `SU...`);
- JSON `{"user": ..., "password": ...}` (what `cplane up --auth` writes, 0600).

A URL still may carry `user:password@`; `redact` is what every log line and
error prints instead of it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import ssl
import stat
from collections.abc import Mapping
from pathlib import Path

from nats.errors import Error as NatsError

from cplane.schemas.settings import NatsSettings

log = logging.getLogger("cplane.bus")

JWT_MARKER = "-----BEGIN NATS USER JWT-----"
SEED_MARKER = "-----BEGIN USER NKEY SEED-----"
_USER_SEED = re.compile(r"SU[A-Z2-7]{56}")  # a user nkey seed: base32, 58 characters
_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)?(?P<userinfo>.*)@(?P<host>[^@]*)$")
MAX_CREDS_BYTES = 64 * 1024


class CredentialsError(ValueError):
    """A credentials or TLS file that cannot be used: one line, naming the path, never
    the content. A ValueError, so `cplane` prints it as its one-line reason."""


def redact(url: str) -> str:
    """`url` with any password (or a bare token, `nats://TOKEN@host`) replaced by `***`;
    each server of a comma-separated list on its own."""
    return ",".join(_redact_one(part) for part in url.split(","))


def server_list(url: str) -> list[str]:
    """The servers of `url` (one, or a comma-separated list: a cluster's nodes), as
    nats-py takes them; it reads a comma-separated string as one server."""
    servers = [part.strip() for part in url.split(",") if part.strip()]
    if not servers:
        raise ValueError(f"no NATS server in {url!r}")
    return servers


def _redact_one(url: str) -> str:
    m = _USERINFO.match(url.strip())
    if m is None:
        return url
    user, sep, _ = m["userinfo"].partition(":")
    userinfo = f"{user}:***" if sep else "***"  # nats-py takes a lone user part as a token
    lead = url[: len(url) - len(url.lstrip())]
    return f"{lead}{m['scheme'] or ''}{userinfo}@{m['host']}"


def _secrets(url: str) -> list[str]:
    found = []
    for part in url.split(","):
        m = _USERINFO.match(part.strip())
        if m is not None:
            user, sep, password = m["userinfo"].partition(":")
            found.append(password if sep else user)
    return [s for s in found if s]


def cannot_reach(url: str, why: object = None) -> ConnectionError:
    """The one-line error of a command that could not connect (the URL redacted);
    `why` (an exception or a reason; its first line, any password of `url` in it
    redacted too) is added in parentheses."""
    reason = ""
    if isinstance(why, BaseException):
        lines = str(why).strip().splitlines()
        reason = f"{type(why).__name__}: {lines[0]}" if lines else type(why).__name__
    elif why:
        reason = str(why).strip().splitlines()[0]
    for secret in _secrets(url):
        reason = reason.replace(secret, "***")
    return ConnectionError(f"cannot reach NATS at {redact(url)}"
                           + (f" ({reason})" if reason else ""))


class ConnectErrors:
    """Keeps the reason a command prints should its connect fail (`record` is the
    `error_cb`): the server's refusal (`nats: 'Authorization Violation'`) over the
    socket errors of the retries after it."""

    def __init__(self) -> None:
        self.reason: Exception | None = None

    async def record(self, exc: Exception) -> None:  # nats-py wants a coroutine function
        if not isinstance(self.reason, NatsError) or isinstance(exc, NatsError):
            self.reason = exc


def connect_options(nats: NatsSettings, env: Mapping[str, str] | None = None
                    ) -> dict[str, object]:
    """The keyword arguments for `nats.connect` that `nats` asks for: credentials
    (the creds file, else `NATS_CREDS`, else `NATS_USER` + `NATS_PASSWORD`) and TLS
    (when `tls_ca` or a client certificate is set, or a server URL is `tls://`).

    Raises `CredentialsError` for a file that is missing, unreadable or of no known kind.
    """
    env = os.environ if env is None else env
    opts: dict[str, object] = {}
    creds = nats.creds or env.get("NATS_CREDS") or None
    if creds:
        opts.update(_creds_options(creds))
    elif env.get("NATS_USER"):
        opts["user"] = env["NATS_USER"]
        opts["password"] = env.get("NATS_PASSWORD", "")
    context = tls_context(nats)
    if context is not None:
        opts["tls"] = context
    return opts


def _read(path: str, what: str) -> str:
    p = Path(path).expanduser()
    try:
        st = p.stat()
        if not stat.S_ISREG(st.st_mode):
            raise CredentialsError(f"{what} {path}: not a regular file")
        if st.st_size > MAX_CREDS_BYTES:
            raise CredentialsError(f"{what} {path}: too large ({st.st_size} bytes)")
        text = p.read_text(encoding="utf-8")
    except CredentialsError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise CredentialsError(f"{what} {path}: cannot read it ({reason})") from None
    if st.st_mode & 0o077:
        log.warning("%s %s is readable by others (mode %o): chmod 600 it",
                    what, path, stat.S_IMODE(st.st_mode))
    return text


def _creds_options(path: str) -> dict[str, object]:
    """What one credentials file stands for (see the module's docstring)."""
    text = _read(path, "credentials file")
    full = str(Path(path).expanduser())
    if JWT_MARKER in text:
        if SEED_MARKER not in text:
            raise CredentialsError(f"credentials file {path}: a user JWT without its nkey seed")
        return {"user_credentials": full}
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) == 1 and lines[0].startswith("SU"):
        if not _USER_SEED.fullmatch(lines[0]):
            raise CredentialsError(f"credentials file {path}: not a valid user nkey seed")
        return {"nkeys_seed": full}
    try:
        data = json.loads(text)
    except ValueError:
        raise CredentialsError(
            f"credentials file {path}: not a NATS .creds file, an nkey seed (SU...) or "
            'JSON {"user": ..., "password": ...}') from None
    if (not isinstance(data, dict) or not isinstance(data.get("user"), str) or not data["user"]
            or not isinstance(data.get("password"), str)):
        raise CredentialsError(
            f'credentials file {path}: JSON, but not {{"user": "...", "password": "..."}}')
    opts: dict[str, object] = {"user": data["user"], "password": data["password"]}
    prefix = data.get("inbox_prefix")  # `cplane up --auth`: each principal's own inboxes
    if isinstance(prefix, str) and prefix:
        opts["inbox_prefix"] = prefix
    return opts


def tls_context(nats: NatsSettings) -> ssl.SSLContext | None:
    """A client TLS context verifying the server with `tls_ca` (else the system's CAs),
    presenting `tls_cert`/`tls_key` when set; None when TLS is not asked for."""
    wants = bool(nats.tls_ca or nats.tls_cert or nats.tls_key) or any(
        part.strip().lower().startswith("tls://") for part in nats.url.split(","))
    if not wants:
        return None
    if nats.tls_key and not nats.tls_cert:
        raise CredentialsError(f"TLS key {nats.tls_key} given without a client certificate "
                               "(--tls-cert)")
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=nats.tls_ca)
    except (OSError, ssl.SSLError) as exc:
        raise CredentialsError(f"TLS CA file {nats.tls_ca}: cannot load it ({_ssl_reason(exc)})"
                               ) from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _quiet_ssl_eof()
    if nats.tls_cert:
        try:
            ctx.load_cert_chain(nats.tls_cert, nats.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise CredentialsError(f"TLS client certificate {nats.tls_cert}: cannot load it "
                                   f"({_ssl_reason(exc)})") from None
    return ctx


class _SslEofFilter(logging.Filter):
    """Drops asyncio's "returning true from eof_received() has no effect when using ssl":
    nats-py's transport (a StreamReaderProtocol) returns True there, so asyncio logs it
    for every TLS connection that closes or retries, which says nothing to a user."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("returning true from eof_received()")


_SSL_EOF_FILTER = _SslEofFilter()


def _quiet_ssl_eof() -> None:
    logging.getLogger("asyncio").addFilter(_SSL_EOF_FILTER)  # once: addFilter skips a repeat


def _ssl_reason(exc: OSError | ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or type(exc).__name__
    return exc.strerror or type(exc).__name__


__all__ = ["ConnectErrors", "CredentialsError", "cannot_reach", "connect_options", "redact",
           "server_list", "tls_context"]
