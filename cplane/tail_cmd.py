"""`cplane tail`: print live outputs, as they are stored.

    cplane tail [--results | --tokens] [--group G] [--json] [--since 5m] [--durable NAME]

`--results` (the default) prints each terminal (Final / ErrorReply) once
LLM_DONE stored it, read through a JetStream consumer (client/results.py):
with `--since` it first replays what was stored since then, with
`--durable` it resumes where that consumer stopped. `--tokens` prints token
chunks from `<prefix>.out.<group>.*` (core NATS; the LLM_OUT stream
republishes each one once stored). One line per message, flushed at once.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import re
import sys
from collections.abc import Callable

import msgspec
import nats
from nats.aio.msg import Msg
from nats.errors import NoServersError

from cplane.bus.credentials import cannot_reach, connect_options, server_list
from cplane.client.results import StoredResult, stored_results
from cplane.schemas.codec import chunk_decoder
from cplane.schemas.messages import ErrorReply, Final, TokenChunk
from cplane.schemas.settings import Settings

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str) -> datetime.timedelta:
    """`90s`, `5m`, `2h`, `1d` (or plain seconds) -> a timedelta."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m:
        raise ValueError(f"--since wants a duration like 90s, 5m, 2h or 1d, not {text!r}")
    return datetime.timedelta(seconds=float(m[1]) * _UNITS[m[2] or "s"])


def _clip(text: str, n: int = 60) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= n else text[: n - 1] + "…"


def result_line(r: StoredResult) -> str:
    """One human line per terminal."""
    t = datetime.datetime.fromtimestamp(r.stored_ms / 1000).strftime("%H:%M:%S.%f")[:-3]
    term = r.terminal
    if isinstance(term, ErrorReply):
        return f"{t} {r.group} {r.request_id} error {term.code.value}: {term.message}"
    tm = term.timings
    return (f"{t} {r.group} {r.request_id} {term.finish_reason.value} "
            f"{term.usage.completion_tokens} tok ttft {tm.ttft_ms:.1f} ms e2e {tm.e2e_ms:.1f} ms "
            f"| {_clip(term.text)}")


def result_json(r: StoredResult) -> str:
    body: Final | ErrorReply = r.terminal
    return msgspec.json.encode({"group": r.group, "stream_seq": r.stream_seq,
                                "stored_ms": r.stored_ms, "message": body}).decode()


def chunk_line(group: str, c: TokenChunk) -> str:
    return f"{group} {c.request_id} #{c.seq} {_clip(c.text)!r}"


async def _tail_results(args: argparse.Namespace, settings: Settings,
                        out: Callable[[str], None]) -> None:
    nc = await nats.connect(server_list(settings.nats.url), max_reconnect_attempts=-1,
                            **connect_options(settings.nats))
    try:
        start = parse_since(args.since) if args.since else None
        async for r in stored_results(nc.jetstream(), settings, durable=args.durable,
                                      start=start, group=args.group):
            out(result_json(r) if args.json else result_line(r))
    finally:
        await nc.close()


async def _tail_tokens(args: argparse.Namespace, settings: Settings,
                       out: Callable[[str], None]) -> None:
    nc = await nats.connect(server_list(settings.nats.url), max_reconnect_attempts=-1,
                            **connect_options(settings.nats))
    subjects = settings.subjects

    async def on_chunk(msg: Msg) -> None:
        try:
            c = chunk_decoder.decode(msg.data)
        except msgspec.DecodeError:
            return
        group = subjects.group_of(msg.subject)
        out(msgspec.json.encode({"group": group, "message": c}).decode() if args.json
            else chunk_line(group, c))

    try:
        await nc.subscribe(subjects.out_of(args.group), cb=on_chunk)
        await asyncio.Event().wait()  # until Ctrl-C / SIGTERM
    finally:
        await nc.close()


def run_tail(args: argparse.Namespace, settings: Settings) -> int:
    def out(line: str) -> None:
        print(line, flush=True)

    if args.tokens and (args.since or args.durable):
        print("cplane tail: --since and --durable read stored results; not with --tokens",
              file=sys.stderr)
        return 2
    if args.since:
        parse_since(args.since)  # a bad duration fails before connecting
    fn = _tail_tokens if args.tokens else _tail_results
    try:
        asyncio.run(fn(args, settings, out))
    except (OSError, NoServersError):
        print(f"cplane tail: {cannot_reach(settings.nats.url)}", file=sys.stderr)
        return 1
    return 0


def add_tail_parser(sp: argparse._SubParsersAction,
                    common: Callable[[argparse.ArgumentParser], None],
                    settings_of: Callable[[argparse.Namespace], Settings]) -> None:
    """`cplane tail` (cplane/cli.py build_parser calls this)."""
    p = sp.add_parser("tail", help="print live results or token chunks as they are stored")
    common(p)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--results", action="store_true", help="terminals (the default)")
    what.add_argument("--tokens", action="store_true", help="token chunks")
    p.add_argument("--group", default="*", help="an output group: i, or a batch job id")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--since", default=None, help="results: replay from this long ago (5m, 2h)")
    p.add_argument("--durable", default=None,
                   help="results: a durable consumer name (resume where it stopped)")
    p.set_defaults(fn=lambda args: run_tail(args, settings_of(args)))


__all__ = ["add_tail_parser", "parse_since", "result_line", "run_tail"]
