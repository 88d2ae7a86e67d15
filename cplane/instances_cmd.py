"""`cplane instances add|remove|list`, and `cplane worker --engine openai` (the process
that fronts remote OpenAI-compatible servers: workers/instances.py).

Exit codes: 0 done; 1 refused (a bad spec, an unknown id) or NATS unreachable,
with a one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
from collections.abc import Callable
from typing import Any

import msgspec

from cplane.schemas.instances import DEFAULT_GROUP, InstanceSpec
from cplane.schemas.messages import Role
from cplane.settings_args import settings_from_args


def add_spec_args(p: argparse.ArgumentParser, *, many: bool) -> None:
    """What describes a server: on `instances add` (one) and `worker --engine openai`."""
    p.add_argument("--url", action="append" if many else "store", required=not many,
                   default=None, help="the server's base URL, e.g. http://10.0.0.7:8000"
                   + (" (repeat: one instance each)" if many else ""))
    p.add_argument("--api", choices=["vllm", "openai"], default="vllm",
                   help="vllm: token ids in and out (exact continuation after a move); "
                        "openai: any OpenAI-compatible server, text only")
    p.add_argument("--tokenizer", default="",
                   help="local tokenizer matching the server's (default: the server's /tokenize)")
    p.add_argument("--kv-events", action="append" if many else "store", default=None,
                   help="the server's KV-event endpoint (vLLM --kv-events-config), e.g. "
                        "tcp://10.0.0.7:5557" + (" (one per --url, in order)" if many else ""))
    p.add_argument("--api-key-env", default="",
                   help="environment variable holding the server's API key")


def add_parsers(sp: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sp.add_parser("instances", help="remote engine instances (OpenAI-compatible servers) "
                      "served by address: add, remove, list")
    isp = p.add_subparsers(dest="instances_cmd", required=True)
    a = isp.add_parser("add", help="register a server; its group's workers front it")
    common(a)
    a.add_argument("instance_id", help="its id: a subject token, used as its worker id")
    add_spec_args(a, many=False)
    a.add_argument("--model", required=True, help="the model name the server serves")
    a.add_argument("--role", choices=[r.value for r in Role], default="unified")
    a.add_argument("--group", default=DEFAULT_GROUP, help="which worker processes front it")
    a.add_argument("--capacity", type=int, default=64, help="requests held there at once")
    a.add_argument("--tensor-parallel-size", type=int, default=1)
    a.add_argument("--gpu-count", type=int, default=1)
    a.set_defaults(fn=cmd_add)
    r = isp.add_parser("remove", help="drain and forget a server")
    common(r)
    r.add_argument("instance_id")
    r.set_defaults(fn=cmd_remove)
    ls = isp.add_parser("list", help="registered servers with their live state")
    common(ls)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(fn=cmd_list)


def cmd_add(args: argparse.Namespace) -> int:
    spec = InstanceSpec(
        instance_id=args.instance_id, url=args.url, model_name=args.model, role=Role(args.role),
        api=args.api, group=args.group, capacity=args.capacity,
        tensor_parallel_size=args.tensor_parallel_size, gpu_count=args.gpu_count,
        kv_events=args.kv_events or "", tokenizer=args.tokenizer,
        api_key_env=args.api_key_env)

    async def run(cp: Any) -> int:
        stored = await cp.register_instance(spec)
        print(f"instance {stored.instance_id} registered: {stored.url} ({stored.role}, "
              f"{stored.model_name}, group {stored.group})")
        return 0

    return _with_control(args, run, "instances add")


def cmd_remove(args: argparse.Namespace) -> int:
    async def run(cp: Any) -> int:
        await cp.unregister_instance(args.instance_id)
        print(f"instance {args.instance_id} removed: its worker drains it")
        return 0

    return _with_control(args, run, "instances remove")


def cmd_list(args: argparse.Namespace) -> int:
    async def run(cp: Any) -> int:
        specs = await cp.list_instances()
        try:
            live = {hb.worker_id: hb for hb in await cp.get_instances()}
        except Exception:  # no orchestrator: the registry alone
            live = {}
        rows = [{**msgspec.structs.asdict(s), "state": str(live[s.instance_id].state)
                 if s.instance_id in live else "not fronted",
                 "held": live[s.instance_id].held_items if s.instance_id in live else 0}
                for s in specs]
        if args.json:
            print(msgspec.json.encode(rows).decode())  # every field, defaults included
            return 0
        if not rows:
            print("no instances registered")
        for r in rows:
            print(f"{r['instance_id']:<20} {r['url']:<32} {r['role']:<8} {r['model_name']:<20} "
                  f"group={r['group']} state={r['state']} held={r['held']}/{r['capacity']}")
        return 0

    return _with_control(args, run, "instances list")


def _with_control(args: argparse.Namespace, run: Callable[[Any], Any], name: str) -> int:
    from cplane.client.control import ControlPlane, NotFound

    settings = settings_from_args(args)

    async def main() -> int:
        try:
            cp = await ControlPlane.connect(settings.nats.url, settings)
        except ConnectionError as exc:
            print(f"cplane {name}: {exc}", file=sys.stderr)
            return 1
        try:
            return int(await run(cp))
        except (ValueError, NotFound) as exc:
            print(f"cplane {name}: {exc}", file=sys.stderr)
            return 1
        finally:
            await cp.close()

    return asyncio.run(main())


# -- the worker process ------------------------------------------------------------------
def static_specs(args: argparse.Namespace, role: str, model: str) -> list[InstanceSpec]:
    """One InstanceSpec per --url; ids from --worker-id (suffixed -1, -2... for several)
    or from the URL."""
    from cplane.client.instances import check_spec

    urls = list(args.url or [])
    events = list(args.kv_events or [])
    if events and len(events) != len(urls):
        raise ValueError(f"{len(events)} --kv-events for {len(urls)} --url: give one per --url")
    specs = []
    for i, url in enumerate(urls):
        base = args.worker_id or "r-" + hashlib.sha1(url.encode()).hexdigest()[:8]
        iid = base if len(urls) == 1 or not args.worker_id else f"{base}-{i + 1}"
        spec = InstanceSpec(instance_id=iid, url=url, model_name=model, role=Role(role),
                            api=args.api, tokenizer=args.tokenizer,
                            kv_events=events[i] if events else "",
                            capacity=args.capacity or 64, api_key_env=args.api_key_env)
        check_spec(spec)
        specs.append(spec)
    return specs


def run_remote_worker(args: argparse.Namespace) -> int:
    """`cplane worker --engine openai`: front the --url servers and/or a group's instances."""
    from cplane.service_run import run_service
    from cplane.workers.instances import FrontOptions, InstanceSupervisor

    if not args.url and not args.group:
        print("cplane worker: --engine openai needs --url (and/or --group)", file=sys.stderr)
        return 1
    if args.url and not args.model:
        print("cplane worker: --engine openai --url needs --model (the served name)",
              file=sys.stderr)
        return 1
    try:
        specs = static_specs(args, args.role, args.model or "")
    except ValueError as exc:
        print(f"cplane worker: {exc}", file=sys.stderr)
        return 1
    settings = settings_from_args(args)
    options = FrontOptions(stall_timeout_s=args.stall_timeout)
    run_service(InstanceSupervisor(settings, specs, args.group, options).run)
    return 0


__all__ = ["add_parsers", "add_spec_args", "run_remote_worker", "static_specs"]
