"""Plugin choices switched at run time for every replica (`cplane policy`, `cplane router`).

The fleet's choice of each switched plugin kind lives in the JetStream KV
bucket `<prefix>_config`, under its own key (`policy`, `router`), as a
`SwitchState` (JSON: `PolicyState`, `RouterState`). Every orchestrator
replica runs one `RuntimeSwitch` per kind (`PolicySwitch`, `RouterSwitch`),
which:

- at start, adopts what the key holds before the replica may lead (the
  stored choice wins over the settings, so a restart keeps it; with no key,
  the settings' `orchestrator.policy` / `policy_params`, or
  `orchestrator.router` / `router_params`, rule);
- watches the key and adopts each new value as the server pushes it, so
  every replica follows a switch within milliseconds; a deleted key means
  "back to the settings";
- answers its admin subject (`<prefix>.admin.policy`, `.router`; queue
  group: one replica answers each request). `set` builds the plugin first:
  an unknown plugin or parameter is refused with the valid choices and
  nothing is stored. A `set` answered ok is stored (file storage) and in
  force on the answering replica.

A stored value that does not build (garbage, or a plugin this version
lacks) is logged and ignored: the replica keeps what it runs. The swap
itself is the `apply` callback's (orchestrator/switches.py): one assignment
between two dispatch steps, never inside one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from cplane.bus.control import ADMIN_GUARD
from cplane.bus.provision import asked, ensure_config_bucket
from cplane.bus.tasks import cancel_all
from cplane.orchestrator import plugins
from cplane.orchestrator.plugin_types import Policy
from cplane.schemas.admin import (
    AdminReply,
    PolicyState,
    RouterState,
    SwitchSet,
    SwitchState,
    policy_command_decoder,
    policy_state_decoder,
    router_command_decoder,
    router_state_decoder,
)
from cplane.schemas.codec import encode
from cplane.schemas.settings import OrchestratorSettings, Settings

POLICY_KEY = "policy"
ROUTER_KEY = "router"
ADMIN_QUEUE = "orchestrators"  # one replica answers each admin request
_DELETED = ("DEL", "PURGE")  # KV operations that remove the key
_WATCH_TIMEOUT_S = 5.0
_PLURAL = {"policy": "policies", "router": "routers", "pd": "pd deciders"}

S = TypeVar("S", bound=SwitchState)
Apply = Callable[[str, Mapping[str, Any]], None]
Build = Callable[[str, Mapping[str, Any]], object]


def policy_order(o: OrchestratorSettings, name: str, params: Mapping[str, Any]) -> Policy:
    """The policy plugin `name` built as the orchestrator runs it; ValueError if it cannot be.

    As at start (dispatch_config): a policy that takes `aging_s` and is not
    given one gets the settings' `orchestrator.aging_s`.
    """
    full = dict(params)
    if plugins.spec("policy", name).accepts("aging_s"):
        full.setdefault("aging_s", o.aging_s)
    return plugins.build_policy(name, full)


def refusal_of(kind: plugins.Kind, build: Build, name: str, params: Mapping[str, Any]
               ) -> AdminReply | None:
    """None when plugin `name` of `kind` builds with `params`; else the refusal, naming
    the valid choices (and, for a known plugin, its parameters)."""
    try:
        build(name, params)
        return None
    except Exception as exc:  # operator input: a factory may refuse it any way it likes
        error = str(exc)
    choices = plugins.names(kind)
    if name not in choices:
        return AdminReply(ok=False, error=f"unknown {kind} {name!r}; valid {_PLURAL[kind]}: "
                          f"{', '.join(choices)}", choices=choices)
    accepted = sorted(plugins.spec(kind, name).params.__struct_fields__)
    error += f"; parameters of {name}: {', '.join(accepted) or 'none'}"
    return AdminReply(ok=False, error=error, choices=choices, param_choices=accepted)


def refusal(o: OrchestratorSettings, name: str, params: Mapping[str, Any]) -> AdminReply | None:
    """The policy's refusal (refusal_of), built as the orchestrator runs it."""
    return refusal_of("policy", lambda n, p: policy_order(o, n, p), name, params)


@dataclass(frozen=True, slots=True)
class Choice(Generic[S]):
    """What one switch switches: a plugin kind, where its choice is stored and asked for."""

    kind: plugins.Kind  # the plugin kind: its names, in refusals and logs
    key: str  # its key in `<prefix>_config`
    subject: str  # its admin subject (get | set)
    default: S  # the settings' choice: in force while no key is stored
    states: msgspec.json.Decoder[S]  # the stored value
    commands: msgspec.json.Decoder[Any]  # the admin subject's tagged union (a get or a SwitchSet)
    build: Build  # the plugin as the orchestrator runs it; raises when it cannot be


class RuntimeSwitch(Generic[S]):
    """One replica's view of the fleet's choice of one plugin kind: adopt, follow,
    answer admin requests. `reply` is the answer telling a choice (and the router
    it leaves in force)."""

    def __init__(self, nc: NATS, js: JetStreamContext, settings: Settings, holder: str,
                 choice: Choice[S], apply: Apply, reply: Callable[[S], AdminReply]) -> None:
        self._nc = nc
        self._js = js
        self._settings = settings
        self._holder = holder
        self.choice = choice
        self._apply = apply
        self._reply = reply
        self._log = logging.getLogger(f"cplane.{choice.kind}_switch")
        self.default = choice.default
        self.state = self.default  # in force on this replica
        self._kv: KeyValue | None = None
        self._sub: Subscription | None = None
        self._follow: asyncio.Task[None] | None = None
        self._watcher: KeyValue.KeyWatcher | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        """Adopt the stored choice, then follow it and answer the admin subject."""
        await self.resume()
        self._sub = await self._nc.subscribe(self.choice.subject, queue=ADMIN_QUEUE,
                                             cb=self._on_admin)
        # The server must know the subscription before we say we are up. nats-py writes
        # a flush's PING ahead of commands still buffered (the SUB), so the first PONG
        # may come back before the SUB left; the second PING follows it.
        await self._nc.flush()
        await self._nc.flush()

    async def resume(self) -> None:
        """(Re)start the watch: at start and after a reconnect (the broker may have
        restarted and forgotten the watch's consumer, or lost the bucket)."""
        async with self._lock:
            await self._stop_watch()
            self._kv = kv = await ensure_config_bucket(self._js, self._settings)
            # Its consumer is a JetStream API request: asked again while a cluster
            # elects (a 503 here once ended a replica's start-up in the chaos run).
            watcher = await asked(lambda: self._watch(kv), f"{self.choice.kind} watch")
            self._watcher = watcher
            self._follow = asyncio.create_task(self._follow_updates(watcher),
                                               name=f"{self.choice.kind}-watch")

    async def _watch(self, kv: KeyValue) -> KeyValue.KeyWatcher:
        """A watch of the choice's key, its current value adopted."""
        watcher = await kv.watch(self.choice.key)
        try:
            # The watch delivers the key's current value first, then a None marker.
            while (entry := await asyncio.wait_for(anext(watcher), _WATCH_TIMEOUT_S)):
                self._adopt_entry(entry)
        except BaseException:
            with contextlib.suppress(Exception):
                await watcher.stop()
            raise
        return watcher

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        async with self._lock:
            await self._stop_watch()

    async def _stop_watch(self) -> None:
        task, self._follow = self._follow, None
        if task is not None:
            await cancel_all([task])
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            with contextlib.suppress(Exception):
                await watcher.stop()

    async def _follow_updates(self, watcher: KeyValue.KeyWatcher) -> None:
        async for entry in watcher:
            if entry is not None:
                self._adopt_entry(entry)

    # -- adopting ------------------------------------------------------------------
    def _adopt_entry(self, entry: KeyValue.Entry) -> None:
        if entry.operation in _DELETED:
            self._adopt(self.default)
            return
        try:
            state = self.choice.states.decode(entry.value or b"")
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._log.warning("%s: ignoring the stored %s (revision %s, not a %s: %s); "
                              "keeping %s", self._holder, self.choice.kind, entry.revision,
                              type(self.default).__name__, exc, self.state.name)
            return
        self._adopt(state)

    def _adopt(self, state: S) -> bool:
        """Put `state` in force here; False (logged, nothing changes) when it does not build."""
        if state == self.state:
            return True  # our own set, seen again through the watch
        try:
            self._apply(state.name, state.params)
        except Exception as exc:  # whatever is stored, the replica keeps running
            self._log.warning("%s: ignoring the stored %s %r: %s; keeping %s", self._holder,
                              self.choice.kind, state.name, exc, self.state.name)
            return False
        self.state = state
        return True

    # -- admin requests --------------------------------------------------------------
    async def _on_admin(self, msg: Msg) -> None:
        if not ADMIN_GUARD.admit(msg, self.choice.subject):
            return  # came sideways (a push consumer aimed here): never applied
        try:
            reply = await self._answer(msg.data)
        except Exception as exc:  # the broker did not answer: say so, the caller may retry
            self._log.warning("%s: admin %s request failed: %s", self._holder,
                              self.choice.kind, exc)
            reply = AdminReply(ok=False, error=f"{type(exc).__name__}: {exc}")
        if msg.reply:
            with contextlib.suppress(Exception):
                await self._nc.publish(msg.reply, encode(reply))

    async def _answer(self, data: bytes) -> AdminReply:
        try:
            cmd = self.choice.commands.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return AdminReply(ok=False, error=f"bad admin request: {exc}")
        if isinstance(cmd, SwitchSet):
            return await self._set(cmd)
        return self._reply(await self.stored())  # the union's other member: a get

    async def _set(self, cmd: SwitchSet) -> AdminReply:
        refused = self.refusal(cmd.name, cmd.params)
        if refused is not None:
            return refused
        state = type(self.default)(name=cmd.name, params=dict(cmd.params),
                                   updated_ms=time.time() * 1000, by=cmd.by or self._holder)
        kv = self._kv or await ensure_config_bucket(self._js, self._settings)
        await kv.put(self.choice.key, encode(state))
        self._adopt(state)  # in force here before the answer; the others follow the watch
        self._log.info("%s: %s set to %s %s by %s", self._holder, self.choice.kind, state.name,
                       state.params, state.by)
        return self._reply(state)

    def refusal(self, name: str, params: Mapping[str, Any]) -> AdminReply | None:
        return refusal_of(self.choice.kind, self.choice.build, name, params)

    async def stored(self) -> S:
        """The fleet's choice: the stored one, else this replica's settings. A stored value
        that does not build is ignored by every replica, so the choice in force here is told."""
        kv = self._kv or await ensure_config_bucket(self._js, self._settings)
        try:
            entry = await kv.get(self.choice.key)
        except KeyNotFoundError:  # never set, or deleted: the settings rule
            return self.default
        try:
            state = self.choice.states.decode(entry.value or b"")
        except (msgspec.DecodeError, msgspec.ValidationError):
            return self.state
        if self.refusal(state.name, state.params) is not None:
            return self.state
        return state


class PolicySwitch(RuntimeSwitch[PolicyState]):
    """The dispatch policy (`<prefix>.admin.policy`, key `policy`). `set_router`: the
    router set for policies without their own (the settings' when not given)."""

    def __init__(self, nc: NATS, js: JetStreamContext, settings: Settings, holder: str,
                 apply: Apply, *, set_router: Callable[[], str] | None = None) -> None:
        o = settings.orchestrator
        self._set_router = set_router or (lambda: o.router)
        choice = Choice(kind="policy", key=POLICY_KEY, subject=settings.subjects.admin_policy,
                        default=PolicyState(name=o.policy, params=dict(o.policy_params),
                                            by="settings"),
                        states=policy_state_decoder, commands=policy_command_decoder,
                        build=lambda name, params: policy_order(o, name, params))
        super().__init__(nc, js, settings, holder, choice, apply,
                         lambda state: AdminReply(ok=True, state=state,
                                                  router=self.router_of(state)))

    def router_of(self, state: PolicyState) -> str:
        """The router `state`'s policy runs with on this replica."""
        try:
            own = policy_order(self._settings.orchestrator, state.name, state.params).router
        except Exception:  # a stored value that does not build: the set router runs
            own = None
        return own.name if own is not None else self._set_router()


class RouterSwitch(RuntimeSwitch[RouterState]):
    """The router (`<prefix>.admin.router`, key `router`). A policy that brings its own
    router (cost_optimized) routes with it whatever is set here: `policy_router` names
    the in-force policy's own router (None when it has none), and every answer's
    `router` tells the router actually in force."""

    def __init__(self, nc: NATS, js: JetStreamContext, settings: Settings, holder: str,
                 apply: Apply, *, policy_router: Callable[[], str | None] = lambda: None
                 ) -> None:
        o = settings.orchestrator
        choice = Choice(kind="router", key=ROUTER_KEY, subject=settings.subjects.admin_router,
                        default=RouterState(name=o.router, params=dict(o.router_params),
                                            by="settings"),
                        states=router_state_decoder, commands=router_command_decoder,
                        build=plugins.build_router)
        super().__init__(nc, js, settings, holder, choice, apply,
                         lambda state: AdminReply(ok=True, router_state=state,
                                                  router=policy_router() or state.name))


__all__ = ["ADMIN_QUEUE", "POLICY_KEY", "ROUTER_KEY", "Choice", "PolicySwitch", "RouterSwitch",
           "RuntimeSwitch", "policy_order", "refusal", "refusal_of"]
