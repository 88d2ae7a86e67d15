"""What every `cplane` command shares: the --nats-url / --config / credentials / TLS
arguments and the one place they become a `Settings` (the CLI and each command module
use it)."""

from __future__ import annotations

import argparse
from typing import Any

from cplane.schemas.settings import DEFAULT_NATS_URL, Settings, load_settings

# --creds, --tls-ca, --tls-cert, --tls-key: each sets the nats key of its name
# (bus/credentials.py reads them).
SECURITY_KEYS = ("creds", "tls_ca", "tls_cert", "tls_key")


def add_common(p: argparse.ArgumentParser) -> None:
    """--nats-url, --config, --creds and --tls-*, on every command that talks to NATS."""
    p.add_argument("--nats-url", default=None, help="NATS server (default: $NATS_URL, then %s)"
                   % DEFAULT_NATS_URL)
    p.add_argument("--config", default=None, help="TOML settings file (or $CPLANE_CONFIG)")
    p.add_argument("--creds", default=None, metavar="FILE",
                   help="NATS credentials: a .creds file, an nkey seed, or JSON "
                        '{"user", "password"} (default: nats.creds, $NATS_CREDS, then '
                        "$NATS_USER/$NATS_PASSWORD); keeps the password off the command line")
    p.add_argument("--tls-ca", default=None, metavar="FILE",
                   help="CA certificate verifying the NATS server (turns TLS on)")
    p.add_argument("--tls-cert", default=None, metavar="FILE",
                   help="client certificate, for a server that verifies clients")
    p.add_argument("--tls-key", default=None, metavar="FILE", help="the client certificate's key")


def settings_from_args(args: argparse.Namespace, **sections: dict[str, Any]) -> Settings:
    """The settings (file, environment, then `sections` from the command line), with
    --nats-url, --creds and --tls-* over all of them."""
    nats: dict[str, Any] = {}
    if getattr(args, "nats_url", None):
        nats["url"] = args.nats_url
    for key in SECURITY_KEYS:
        if getattr(args, key, None):
            nats[key] = getattr(args, key)
    if nats:
        sections["nats"] = {**sections.get("nats", {}), **nats}
    return load_settings(getattr(args, "config", None), **sections)


__all__ = ["add_common", "settings_from_args"]
