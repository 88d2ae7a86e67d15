"""What every `cplane` command shares: the --nats-url / --config arguments and the
one place they become a `Settings` (the CLI and each command module use it)."""

from __future__ import annotations

import argparse
from typing import Any

from cplane.schemas.settings import DEFAULT_NATS_URL, Settings, load_settings


def add_common(p: argparse.ArgumentParser) -> None:
    """--nats-url and --config, on every command that talks to NATS."""
    p.add_argument("--nats-url", default=None, help="NATS server (default: $NATS_URL, then %s)"
                   % DEFAULT_NATS_URL)
    p.add_argument("--config", default=None, help="TOML settings file (or $CPLANE_CONFIG)")


def settings_from_args(args: argparse.Namespace, **sections: dict[str, Any]) -> Settings:
    """The settings (file, environment, then `sections` from the command line), with
    --nats-url over all of them."""
    nats: dict[str, Any] = {}
    if getattr(args, "nats_url", None):
        nats["url"] = args.nats_url
    if nats:
        sections["nats"] = {**sections.get("nats", {}), **nats}
    return load_settings(getattr(args, "config", None), **sections)


__all__ = ["add_common", "settings_from_args"]
