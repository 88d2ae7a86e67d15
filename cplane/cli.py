"""`cplane`: the command line. Every client command takes --nats-url
(default: $NATS_URL, then nats://127.0.0.1:4222). Errors end with a one-line
reason and a non-zero exit code."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Literal

from cplane.instances_cmd import add_parsers as add_instances_parsers
from cplane.instances_cmd import add_spec_args
from cplane.plan_cmd import add_parser as add_plan_parser
from cplane.service_run import run_service
from cplane.settings_args import add_common, settings_from_args
from cplane.status_cmd import add_parsers as add_status_parsers


# -- services ---------------------------------------------------------------
def cmd_orchestrator(args: argparse.Namespace) -> int:
    from cplane.orchestrator.service import Orchestrator

    o: dict[str, Any] = {}
    if args.policy:
        o["policy"] = args.policy
    if args.router:
        o["router"] = args.router
    if args.pd_mode:
        o["pd_mode"] = args.pd_mode
    if args.partitions is not None:
        o["partitions"] = [m.strip() for m in args.partitions.split(",") if m.strip()]
    settings = settings_from_args(args, orchestrator=o)
    run_service(Orchestrator(settings).run)
    return 0


def _vllm_options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for key in ("kv_connector", "kv_shared_path", "max_model_len", "dtype", "block_size",
                "gpu_memory_utilization", "scheduling_policy", "served_model_name",
                "kv_cache_memory_bytes"):
        value = getattr(args, key, None)
        if value is not None:
            opts[key] = value
    if args.enforce_eager:
        opts["enforce_eager"] = True
    extra: dict[str, Any] = {}
    if args.tensor_parallel_size:
        extra["tensor_parallel_size"] = args.tensor_parallel_size
    for kv in args.engine_arg or []:
        key, _, value = kv.partition("=")
        try:  # numbers, booleans, lists and dicts as JSON; anything else as a string
            extra[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            extra[key.replace("-", "_")] = value
    if extra:
        opts["extra_engine_args"] = extra
    return opts


def _catalogue_prices(args: argparse.Namespace) -> dict[str, Any]:
    """--price-gpu: the worker's prices from the GPU catalogue and its layout's
    predicted throughput (fleetsim/pricing.py). A bad GPU or config: exit 2."""
    from cplane.fleetsim import gpus, model_config
    from cplane.fleetsim.perf_model import Layout
    from cplane.fleetsim.pricing import catalogue_prices

    config = args.price_model or args.model
    if not config or not (Path(config) / "config.json").is_file():
        raise SystemExit(f"--price-gpu needs a model directory with config.json (--price-model "
                         f"or --model); got {config!r}")
    extra = _vllm_options(args).get("extra_engine_args", {})
    lay = Layout(tp=int(extra.get("tensor_parallel_size") or 1),
                 pp=int(extra.get("pipeline_parallel_size") or 1))
    try:
        p = catalogue_prices(model_config.load(config), gpus.gpu(args.price_gpu), lay)
    except (KeyError, ValueError) as exc:
        raise SystemExit(f"--price-gpu {args.price_gpu}: {exc}") from None
    return {"price_in_per_1k": p.in_per_1k, "price_out_per_1k": p.out_per_1k,
            "price_source": p.source}


def cmd_worker(args: argparse.Namespace) -> int:
    from cplane.workers.factory import build_engine
    from cplane.workers.runtime import Worker

    if args.engine == "openai":
        from cplane.instances_cmd import run_remote_worker

        return run_remote_worker(args)
    w: dict[str, Any] = {"role": args.role}
    for key in ("worker_id", "model", "capacity"):
        if getattr(args, key) is not None:
            w[key] = getattr(args, key)
    if args.price_gpu:
        w.update(_catalogue_prices(args))
    sim: dict[str, Any] = {"zero_cost": True} if args.zero_cost else {}
    settings = settings_from_args(args, worker=w, sim=sim)
    engine = build_engine(args.engine, settings, _vllm_options(args))

    async def main(stop: asyncio.Event, ready: asyncio.Event) -> None:
        await engine.start()
        try:
            await Worker(settings, engine).run(stop, ready)
        finally:
            await engine.shutdown()

    run_service(main)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from cplane.stack import Stack, StackSpec

    spec = StackSpec(
        nats_url=args.nats_url or os.environ.get("NATS_URL"),
        config=args.config,
        workers=args.workers,
        engine=args.engine,
        model=args.model or ("sim" if args.engine == "sim" else ""),
        capacity=args.capacity,
        zero_cost=args.zero_cost,
        pd=args.pd,
        extra_worker_args=args.worker_arg or [],
        auth=args.auth or bool(args.tenant),
        tenants=args.tenant or [],
        tls=args.tls,
        as_json=args.json,
        cluster=args.cluster,
        orchestrators=args.orchestrators or 0,
        urls=args.url or [],
    )
    if spec.cluster and spec.nats_url:
        print("cplane up: --cluster starts its own nats-servers; it cannot with --nats-url",
              file=sys.stderr)
        return 2
    if args.cluster < 0 or (args.orchestrators is not None and args.orchestrators < 1):
        print("cplane up: --cluster takes a node count, --orchestrators at least 1",
              file=sys.stderr)
        return 2
    if spec.auth and spec.nats_url:
        print("cplane up: --auth configures the embedded server; it cannot with --nats-url",
              file=sys.stderr)
        return 2
    if args.engine == "vllm" and not args.model:
        print("cplane up: --engine vllm needs --model PATH", file=sys.stderr)
        return 2
    if args.engine == "openai" and not (args.url and args.model):
        print("cplane up: --engine openai needs --url (one per server) and --model (the name "
              "they serve)", file=sys.stderr)
        return 2
    if (args.url or []) and args.engine != "openai":
        print("cplane up: --url is for --engine openai", file=sys.stderr)
        return 2
    if args.engine == "openai" and spec.auth:
        print("cplane up: --engine openai does not run with --auth yet (a worker principal "
              "is rendered per worker id, not per instance)", file=sys.stderr)
        return 2
    return Stack(spec).run_foreground()


# -- client commands --------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    from cplane.client.sdk import (
        Client,
        Overloaded,
        RejectedAtPublish,
        RequestFailed,
        Unavailable,
        new_request_id,
    )
    from cplane.schemas.messages import Priority, Request

    settings = settings_from_args(args)
    req = Request(
        request_id=args.request_id or new_request_id(),
        prompt=args.prompt,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        model=args.model or "",
        priority=Priority(args.priority),
        slo_class=args.slo_class,
        ignore_eos=args.ignore_eos,
    )

    async def main() -> int:
        client = await Client.connect(settings.nats.url, settings, connect_timeout_s=5.0)
        try:
            handle = await client.submit(req)
            async with asyncio.timeout(args.timeout):
                async for chunk in handle:
                    if not args.json:
                        print(chunk.text, end="", flush=True)
                final = await handle.result()
            if args.json:
                import msgspec

                print(msgspec.json.encode(final).decode())
            else:
                t = final.timings
                print(f"\n[{final.finish_reason} | {final.usage.completion_tokens} tokens | "
                      f"ttft {t.ttft_ms:.1f} ms | e2e {t.e2e_ms:.1f} ms]", file=sys.stderr)
            return 0
        except RequestFailed as exc:
            print(f"\nerror: {exc}", file=sys.stderr)
            return 1
        except (Overloaded, RejectedAtPublish, Unavailable) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except TimeoutError:
            print(f"\nerror: no result within {args.timeout} s", file=sys.stderr)
            return 1
        finally:
            await client.close()

    return asyncio.run(main())


def _param_value(text: str) -> Any:
    try:  # numbers, booleans, lists and dicts as JSON; anything else as a string
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def cmd_policy(args: argparse.Namespace) -> int:
    """`policy get` / `policy set NAME [--param k=v ...]`: 0 ok, 1 no answer, 2 refused."""
    import socket

    from cplane.client.admin import Admin, NoOrchestrator
    from cplane.client.sdk import Client

    settings = settings_from_args(args)
    params: dict[str, Any] = {}
    for kv in getattr(args, "param", None) or []:
        key, sep, value = kv.partition("=")
        if not sep or not key:
            print(f"cplane policy: --param wants KEY=VALUE, got {kv!r}", file=sys.stderr)
            return 2
        params[key.replace("-", "_")] = _param_value(value)

    async def main() -> int:
        try:
            client = await Client.connect(settings.nats.url, settings, connect_timeout_s=5.0)
        except ConnectionError as exc:
            print(f"cplane policy: {exc}", file=sys.stderr)
            return 1
        try:
            admin = Admin(client.nc, settings, timeout_s=args.timeout)
            if args.policy_cmd == "set":
                by = f"{os.environ.get('USER', 'cplane')}@{socket.gethostname()}"
                reply = await admin.set_policy(args.name, params, by=by)
            else:
                reply = await admin.get_policy()
        except NoOrchestrator as exc:
            print(f"cplane policy: {exc}", file=sys.stderr)
            return 1
        finally:
            await client.close()
        if not reply.ok or reply.state is None:
            print(f"cplane policy: refused: {reply.error}", file=sys.stderr)
            return 2 if reply.choices else 1  # refused with choices, else it failed
        st = reply.state
        where = (f"set by {st.by or '?'} at {_iso(st.updated_ms)}" if st.updated_ms
                 else "from the settings")
        print(f"policy: {st.name} {json.dumps(st.params, sort_keys=True)} ({where}); "
              f"router: {reply.router or '?'}")
        return 0

    return asyncio.run(main())


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--param wants KEY=VALUE, got {text!r}")
    return key.replace("-", "_"), _param_value(value)


def cmd_router(args: argparse.Namespace) -> int:
    """`router get [--json]` / `router set NAME [--param k=v ...]`: 0 ok, 1 no answer,
    2 refused. The router in force is told too: a policy's own router wins."""
    import socket

    from cplane.client.admin import Admin
    from cplane.client.control import ControlPlane

    settings = settings_from_args(args)
    params = dict(_key_value(kv) for kv in getattr(args, "param", None) or [])  # bad: exit 2

    async def ask() -> Any:
        async with await ControlPlane.connect(settings.nats.url, settings) as cp:
            admin = Admin(cp.nc, settings, timeout_s=args.timeout)
            if args.router_cmd == "get":
                return await admin.get_router()
            by = f"{os.environ.get('USER', 'cplane')}@{socket.gethostname()}"
            return await admin.set_router(args.name, params, by=by)

    try:
        reply = asyncio.run(ask())
    except ConnectionError as exc:  # unreachable, or no orchestrator answered (NoOrchestrator)
        print(f"cplane router: {exc}", file=sys.stderr)
        return 1
    st = reply.router_state
    if not reply.ok or st is None:
        print(f"cplane router: refused: {reply.error}", file=sys.stderr)
        return 2 if reply.choices else 1  # refused with choices, else it failed
    if getattr(args, "json", False):
        print(json.dumps({"name": st.name, "params": st.params, "by": st.by,
                          "updated_ms": st.updated_ms, "in_force": reply.router}))
        return 0
    where = (f"set by {st.by or '?'} at {_iso(st.updated_ms)}" if st.updated_ms
             else "from the settings")
    print(f"router: {st.name} {json.dumps(st.params, sort_keys=True)} ({where}); "
          f"in force: {reply.router or '?'}")
    return 0


def cmd_workers(args: argparse.Namespace) -> int:
    """`workers`: every live worker from its heartbeats (see cplane/workers_cmd.py)."""
    from cplane.workers_cmd import run_workers

    return run_workers(settings_from_args(args), args.wait, args.json)


def _iso(ms: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).isoformat(
        timespec="seconds")


def cmd_schema(args: argparse.Namespace) -> int:
    from cplane.schemas.export import EXPORTED_TYPES, render, write_all

    if args.out:
        for path in write_all(Path(args.out)):
            print(path)
    else:
        print(json.dumps({n: json.loads(render(n)) for n in EXPORTED_TYPES}, indent=2))
    return 0


def cmd_bench_policies(args: argparse.Namespace) -> int:
    from cplane.fleetsim import bench

    return bench.main(args, sys.argv[2:] if len(sys.argv) > 2 else None)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cplane", description=__doc__.split("\n")[0])
    ap.add_argument("-v", "--verbose", action="store_true")
    sp = ap.add_subparsers(dest="cmd", required=True)

    p = sp.add_parser("up", help="start nats-server (embedded), the orchestrator and workers")
    add_common(p)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--engine", choices=["sim", "vllm", "openai"], default="sim")
    p.add_argument("--url", action="append", default=None,
                   help="openai: a running OpenAI-compatible server (vllm serve...) to front; "
                        "repeat for several")
    p.add_argument("--model", default=None)
    p.add_argument("--capacity", type=int, default=None)
    p.add_argument("--zero-cost", action="store_true", help="sim steps take no time")
    p.add_argument("--pd", action="store_true",
                   help="vllm: one prefill + one decode worker (ExampleConnector) instead")
    p.add_argument("--worker-arg", action="append", help="extra argument for every worker")
    p.add_argument("--auth", action="store_true",
                   help="multi-tenant accounts: a user per process, credentials written and "
                        "printed (docs/security.md)")
    p.add_argument("--tenant", action="append", metavar="NAME",
                   help="a tenant account (implies --auth; repeat for more)")
    p.add_argument("--tls", action="store_true", help="TLS-only server with a throwaway CA")
    p.add_argument("--cluster", type=int, nargs="?", const=3, default=0, metavar="N",
                   help="a JetStream cluster of N nats-servers (default 3) on loopback, every "
                        "stream and store replicated on min(N, 3) of them; prints each URL")
    p.add_argument("--orchestrators", type=int, default=None, metavar="N",
                   help="orchestrator replicas (one leads); default 1, 2 with --cluster")
    p.add_argument("--json", action="store_true",
                   help="with --auth: one JSON line per principal (principal, role, tenant, "
                        "url, user, password, file)")
    p.set_defaults(fn=cmd_up)

    p = sp.add_parser("orchestrator", help="run an orchestrator replica")
    add_common(p)
    p.add_argument("--policy", default=None, help="a policy plugin: " + ", ".join(
        _plugin_names("policy")))
    p.add_argument("--router", default=None, help="a router plugin: " + ", ".join(
        _plugin_names("router")))
    p.add_argument("--pd-mode", choices=["never", "always", "auto", "adaptive"], default=None)
    p.add_argument("--partitions", default=None, metavar="M1,M2",
                   help="models whose pools get a leader of their own (orchestrator."
                        "partitions; every replica and client the same list)")
    p.set_defaults(fn=cmd_orchestrator)

    p = sp.add_parser("worker", help="run a worker hosting one engine, or fronting remote "
                      "OpenAI-compatible servers (--engine openai)")
    add_common(p)
    p.add_argument("--engine", choices=["sim", "vllm", "openai"], default="sim")
    add_spec_args(p, many=True)
    p.add_argument("--group", default=None, help="openai: also front the instances "
                   "registered for this group (`cplane instances add`), added and removed live")
    p.add_argument("--stall-timeout", type=float, default=120.0,
                   help="openai: seconds without a byte from a server mid-request: a fault")
    p.add_argument("--role", choices=["unified", "prefill", "decode"], default="unified")
    p.add_argument("--model", default=None, help="model name (sim) or path (vllm)")
    p.add_argument("--worker-id", default=None)
    p.add_argument("--capacity", type=int, default=None)
    p.add_argument("--zero-cost", action="store_true")
    p.add_argument("--kv-connector", choices=["ExampleConnector", "NixlConnector"], default=None)
    p.add_argument("--kv-shared-path", default=None, help="ExampleConnector's shared directory")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=None)
    p.add_argument("--tensor-parallel-size", type=int, default=None)
    p.add_argument("--scheduling-policy", choices=["fcfs", "priority"], default=None)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--served-model-name", default=None, help="the name requests use")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    p.add_argument("--engine-arg", action="append", help="any AsyncEngineArgs field: KEY=VALUE")
    p.add_argument("--price-gpu", default=None, help="derive this worker's prices from the GPU "
                   "catalogue (e.g. h100-80gb): GPU-hours over the layout's predicted tokens/s")
    p.add_argument("--price-model", default=None, help="with --price-gpu: the model directory "
                   "(config.json) to price, when --model is not one (sim workers)")
    p.set_defaults(fn=cmd_worker)

    p = sp.add_parser("generate", help="send one request and stream its text")
    add_common(p)
    p.add_argument("prompt")
    p.add_argument("--priority", choices=[p.value for p in _priorities()], default="normal")
    p.add_argument("--slo-class", default="standard")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--model", default=None)
    p.add_argument("--request-id", default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--json", action="store_true", help="print the Final as JSON")
    p.set_defaults(fn=cmd_generate)

    p = sp.add_parser("policy", help="get or switch the dispatch policy of every orchestrator")
    pp = p.add_subparsers(dest="policy_cmd", required=True)
    g = pp.add_parser("get", help="print the policy in force: name, parameters, who set it")
    add_common(g)
    g.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer")
    g.set_defaults(fn=cmd_policy)
    g = pp.add_parser("set", help="switch every orchestrator replica (kept across restarts)")
    add_common(g)
    g.add_argument("name", help="a policy plugin: " + ", ".join(_plugin_names("policy")))
    g.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="a policy parameter (value as JSON when it parses, else a string)")
    g.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer")
    g.set_defaults(fn=cmd_policy)

    p = sp.add_parser("router", help="get or switch the router of every orchestrator")
    rp = p.add_subparsers(dest="router_cmd", required=True)
    g = rp.add_parser("get", help="print the router choice and the router in force")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g = rp.add_parser("set", help="switch every orchestrator replica (kept across restarts; "
                                  "a policy with its own router keeps it)")
    g.add_argument("name", help="a router plugin: " + ", ".join(_plugin_names("router")))
    g.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="a router parameter (value as JSON when it parses, else a string)")
    for g in rp.choices.values():
        add_common(g)
        g.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer")
        g.set_defaults(fn=cmd_router)

    p = sp.add_parser("workers", help="list live workers from their heartbeats, with health")
    add_common(p)
    p.add_argument("--wait", type=float, default=None, metavar="S",
                   help="seconds to collect heartbeats (default: worker.heartbeat_s + 0.5); "
                        "returns earlier once every worker that answered the request is in")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.set_defaults(fn=cmd_workers)

    _gateway_parser(sp)
    add_status_parsers(sp, add_common)  # status, metrics, request ID, cancel ID
    add_instances_parsers(sp, add_common)  # instances add | remove | list
    from cplane.batch_cmd import add_batch_parser  # batch jobs and streaming consumers
    from cplane.tail_cmd import add_tail_parser
    add_batch_parser(sp, add_common, settings_from_args)
    add_tail_parser(sp, add_common, settings_from_args)

    p = sp.add_parser("bench", help="benchmarks that need no broker")
    bp = p.add_subparsers(dest="bench", required=True)
    p = bp.add_parser("policies", help="policies x routers on a trace, in the fleet simulator")
    _bench_arguments(p)
    p.set_defaults(fn=cmd_bench_policies)

    add_plan_parser(sp)  # plan, plan predict

    p = sp.add_parser("schema", help="export the wire types as JSON Schema")
    p.add_argument("--out", default=None, help="directory for one file per type")
    p.set_defaults(fn=cmd_schema)
    return ap


def _gateway_parser(sp: Any) -> None:
    from cplane.gateway_cmd import add_parser

    add_parser(sp, add_common)


def _bench_arguments(p: argparse.ArgumentParser) -> None:
    from cplane.fleetsim.bench import add_arguments

    add_arguments(p)


def _plugin_names(kind: Literal["policy", "router"]) -> list[str]:
    from cplane.orchestrator.plugins import names

    return names(kind)


def _priorities() -> list[Any]:
    from cplane.schemas.messages import PRIORITIES

    return list(PRIORITIES)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = os.environ.get("CPLANE_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.fn(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError, ConnectionError) as exc:
        print(f"cplane {args.cmd}: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # nats connection errors and the like: one line, not a trace
        if args.verbose:
            raise
        print(f"cplane {args.cmd}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
