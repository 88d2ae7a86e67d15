"""`cplane gateway`: the OpenAI-compatible HTTP gateway (gateway/app.py) as a service.

It listens on `gateway.host:gateway.port` (`--host`/`--port`; port 0 = a free
one), or on a socket inherited from `cplane up` (`--fd`), prints
`gateway: http://HOST:PORT` once it listens, and stops on SIGINT/SIGTERM
(open streams get 5 s, then their requests are cancelled).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
from collections.abc import Callable
from typing import Any

from cplane.schemas.settings import Settings
from cplane.service_run import run_service
from cplane.settings_args import settings_from_args


def url_of(sock: socket.socket, tls: bool = False) -> str:
    host, port = sock.getsockname()[:2]
    scheme = "https" if tls else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def add_parser(sp: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register `cplane gateway` on the CLI's subparsers."""
    p = sp.add_parser("gateway", help="serve the OpenAI HTTP API (/v1/chat/completions...) "
                                      "onto the request queues")
    common(p)
    p.add_argument("--host", default=None, help="listen address (default: gateway.host, "
                                                "127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default: gateway.port; 0 = free)")
    p.add_argument("--fd", type=int, default=None, help=argparse.SUPPRESS)  # from `cplane up`
    p.add_argument("--api-key", action="append", metavar="KEY=TENANT",
                   help="accept this API key for this tenant (repeatable; adds to the settings)")
    p.set_defaults(fn=cmd_gateway)


def cmd_gateway(args: argparse.Namespace) -> int:
    from cplane.gateway.app import listen, serve

    g: dict[str, Any] = {}
    if args.host is not None:
        g["host"] = args.host
    if args.port is not None:
        g["port"] = args.port
    keys: dict[str, str] = {}
    for kv in args.api_key or []:
        key, sep, tenant = kv.partition("=")
        if not sep or not key or not tenant:
            raise ValueError(f"--api-key wants KEY=TENANT, got {kv!r}")
        keys[key] = tenant
    settings: Settings = settings_from_args(args, gateway=g)
    if keys:
        settings = _with_keys(settings, keys)
    if args.fd is not None:
        sock = socket.socket(fileno=args.fd)
    else:
        sock = listen(settings.gateway.host, settings.gateway.port)
    print(f"gateway: {url_of(sock, bool(settings.gateway.tls_cert))}", flush=True)

    async def main(stop: asyncio.Event, ready: asyncio.Event) -> None:
        ready.set()  # what the gateway builds at start is small; freeze the imports
        await serve(settings, sock, stop)

    run_service(main)
    return 0


def _with_keys(settings: Settings, keys: dict[str, str]) -> Settings:
    import msgspec

    gw = settings.gateway
    return msgspec.structs.replace(
        settings, gateway=msgspec.structs.replace(gw, api_keys={**gw.api_keys, **keys}))
