"""The runtime switches of one orchestrator replica, wired to its decision core.

`Switches` owns the replica's `PolicySwitch` and `RouterSwitch`
(runtime_config.py): what they adopt (at start, from the watch, from an admin
`set`) is applied here, between two dispatch steps (steps are synchronous: no
step sees half a switch), and dispatch is woken to plan again.

Which router routes: a policy that brings its own router (cost_optimized:
`cheapest`) routes with it, whatever router is set; every other policy routes
with the router set by `cplane router set`, else the settings'
`orchestrator.router`. `policy get` and `router get` both answer the router
actually in force (`AdminReply.router`); `router get` also tells the router
choice, which takes effect again once the policy no longer brings its own.

The prefix inputs follow the router in use. While it reads prompt prefixes
(`Router.reads_prefix`: prefix_aware, locality), intake hashes each prompt
into blocks (`PromptHasher`) and a `KvFeed` folds the workers' KV events into
the prefix index (precise prefix routing). A switch to such a router builds
the hasher before the swap (a tokenizer that does not load makes the switch
fail like a bad parameter: logged, ignored); the feed starts right after,
asking each live worker for a snapshot of its cache. A switch away stops the
feed. Every replica does this for itself as it follows the watch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from cplane.bus.tasks import cancel_all
from cplane.orchestrator import plugins
from cplane.orchestrator.core import DecisionCore
from cplane.orchestrator.fleet import Registry
from cplane.orchestrator.kv_feed import KvFeed
from cplane.orchestrator.plugin_types import Router
from cplane.orchestrator.prompt_hash import PromptHasher
from cplane.orchestrator.runtime_config import PolicySwitch, RouterSwitch, policy_order
from cplane.schemas.messages import WorkItem
from cplane.schemas.settings import Settings

log = logging.getLogger("cplane.orchestrator")  # the service's: a switch is its event


class Switches:
    """The policy and router switches of one replica, and the prefix inputs that
    follow the router in use. `replan` is called after each switch."""

    def __init__(self, settings: Settings, core: DecisionCore[WorkItem], registry: Registry,
                 holder: str, replan: Callable[[], None]) -> None:
        self._settings = settings
        self._core = core
        self._registry = registry
        self._holder = holder
        self._replan = replan
        self.policy_name = settings.orchestrator.policy  # in force now
        self._made: PromptHasher | None = None  # built once, kept across switches
        self.hasher: PromptHasher | None = None  # hashes prompts at intake (a prefix router)
        self._hasher_for(core.cfg.router_in_use)
        self.kv: KvFeed | None = None  # workers' KV events into the prefix index
        self._nc: NATS | None = None
        self._feed_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self.policy: PolicySwitch
        self.router: RouterSwitch

    async def start(self, nc: NATS, js: JetStreamContext) -> None:
        """Adopt the stored choices (before the replica may lead), follow them, answer
        `<prefix>.admin.policy` and `.router`; the prefix inputs as the result needs."""
        s, holder = self._settings, self._holder
        self.router = RouterSwitch(nc, js, s, holder, self.use_router,
                                   policy_router=self._policy_router)
        self.policy = PolicySwitch(nc, js, s, holder, self.use_policy,
                                   set_router=lambda: self.router.state.name)
        await self.router.start()
        await self.policy.start()
        self._nc = nc
        await self.follow_router()

    async def resume(self) -> None:
        """After a reconnect: both watches again."""
        await self.policy.resume()
        await self.router.resume()

    async def stop(self) -> None:
        await self.policy.stop()
        await self.router.stop()
        self._nc = None  # no feed starts from here on...
        async with self._feed_lock:  # ...but one starting now finishes, then stops
            feed, self.kv = self.kv, None
            if feed is not None:
                await feed.stop()
        await cancel_all(list(self._tasks))

    # -- applying (the switches' callbacks; raise, and change nothing, on a bad choice) --
    def use_policy(self, name: str, params: Mapping[str, Any]) -> None:
        """Dispatch by policy `name` from the next step on."""
        policy = policy_order(self._settings.orchestrator, name, params)
        self._hasher_for(policy.router or self._core.cfg.router)
        self._core.use_policy(policy)
        self.policy_name = name
        log.info("orchestrator %s: policy %s %s", self._holder, name, dict(params))
        self._switched()

    def use_router(self, name: str, params: Mapping[str, Any]) -> None:
        """Route with router `name` from the next step on (unless the policy has its own)."""
        router = plugins.build_router(name, params)
        self._hasher_for(self._core.cfg.policy.router or router)
        self._core.use_router(router)  # journaled: a replay follows the switch
        log.info("orchestrator %s: router %s %s (in force: %s)", self._holder, name,
                 dict(params), self._core.cfg.router_in_use.name)
        self._switched()

    def _policy_router(self) -> str | None:
        own = self._core.cfg.policy.router
        return own.name if own is not None else None

    def _hasher_for(self, router: Router) -> None:
        """The intake hasher `router` needs (built, or None): raises when it cannot be."""
        if not router.reads_prefix:
            self.hasher = None
            return
        if self._made is None:
            o = self._settings.orchestrator
            self._made = PromptHasher(o.prefix_tokenizer, o.prefix_block_tokens,
                                      self._settings.sim.vocab_size)
        self.hasher = self._made

    def _switched(self) -> None:
        self._replan()
        if self._nc is not None:  # else start() follows the router once both are adopted
            task = asyncio.create_task(self.follow_router(), name="kv-feed-switch")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # -- the KV-event feed ---------------------------------------------------------------
    async def follow_router(self) -> None:
        """Start or stop the KV-event feed as the router in use needs. Reads what is in
        force when it runs, so switches in quick succession end in the last one's state."""
        async with self._feed_lock:
            nc = self._nc
            want = self._core.cfg.router_in_use.reads_prefix
            if want and self.kv is None and nc is not None:
                o = self._settings.orchestrator
                feed = KvFeed(nc, self._settings.subjects, self._core.state.prefix,
                              o.prefix_block_tokens, known=self._registry.knows)
                live = [hb.worker_id for hb in self._registry.heartbeats(time.time() * 1000)]
                await feed.start(resync=live)  # met mid-life: their caches in full
                self.kv = feed
            elif not want and self.kv is not None:
                feed, self.kv = self.kv, None
                await feed.stop()
                log.info("orchestrator %s: KV-event feed stopped (router %s)", self._holder,
                         self._core.cfg.router_in_use.name)


__all__ = ["Switches"]
