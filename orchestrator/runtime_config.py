"""The dispatch policy, switched at run time for every replica (`cplane policy`).

The fleet's choice lives in the JetStream KV bucket `<prefix>_config`, key
`policy`, as a `PolicyState` (JSON). Every orchestrator replica runs one
`PolicySwitch`, which:

- at start, adopts what the key holds before the replica may lead (the
  stored choice wins over the settings, so a restart keeps it; with no key,
  the settings' `orchestrator.policy` / `policy_params` rule);
- watches the key and adopts each new value as the server pushes it, so
  every replica follows a switch within milliseconds; a deleted key means
  "back to the settings";
- answers `<prefix>.admin.policy` (queue group: one replica answers each
  request). `set` builds the plugin first: an unknown policy or parameter is
  refused with the valid choices and nothing is stored. A `set` answered ok
  is stored (file storage) and in force on the answering replica.

A stored value that does not build (garbage, or a policy this version
lacks) is logged and ignored: the replica keeps the policy it runs. The
swap itself is the `apply` callback's (Orchestrator.use_policy): one
assignment between two dispatch steps, never inside one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from cplane.bus.control import ADMIN_GUARD
from cplane.bus.provision import ensure_config_bucket
from cplane.bus.tasks import cancel_all
from cplane.orchestrator import plugins
from cplane.orchestrator.plugin_types import Policy
from cplane.schemas.admin import (
    AdminReply,
    PolicyGet,
    PolicySet,
    PolicyState,
    policy_command_decoder,
    policy_state_decoder,
)
from cplane.schemas.codec import encode
from cplane.schemas.settings import OrchestratorSettings, Settings

log = logging.getLogger("cplane.policy_switch")
POLICY_KEY = "policy"
ADMIN_QUEUE = "orchestrators"  # one replica answers each admin request
_DELETED = ("DEL", "PURGE")  # KV operations that remove the key
_WATCH_TIMEOUT_S = 5.0

Apply = Callable[[str, Mapping[str, Any]], None]


def policy_order(o: OrchestratorSettings, name: str, params: Mapping[str, Any]) -> Policy:
    """The policy plugin `name` built as the orchestrator runs it; ValueError if it cannot be.

    As at start (dispatch_config): a policy that takes `aging_s` and is not
    given one gets the settings' `orchestrator.aging_s`.
    """
    full = dict(params)
    if plugins.spec("policy", name).accepts("aging_s"):
        full.setdefault("aging_s", o.aging_s)
    return plugins.build_policy(name, full)


def refusal(o: OrchestratorSettings, name: str, params: Mapping[str, Any]) -> AdminReply | None:
    """None when `name` with `params` builds; else the refusal, naming the valid choices."""
    try:
        policy_order(o, name, params)
        return None
    except Exception as exc:  # operator input: a factory may refuse it any way it likes
        error = str(exc)
    choices = plugins.names("policy")
    if name not in choices:
        return AdminReply(ok=False, error=f"unknown policy {name!r}; valid policies: "
                          f"{', '.join(choices)}", choices=choices)
    accepted = sorted(plugins.spec("policy", name).params.__struct_fields__)
    error += f"; parameters of {name}: {', '.join(accepted) or 'none'}"
    return AdminReply(ok=False, error=error, choices=choices, param_choices=accepted)


class PolicySwitch:
    """One replica's view of the fleet's policy choice: adopt, follow, answer admin requests."""

    def __init__(self, nc: NATS, js: JetStreamContext, settings: Settings, holder: str,
                 apply: Apply) -> None:
        self._nc = nc
        self._js = js
        self._settings = settings
        self._holder = holder
        self._apply = apply
        o = settings.orchestrator
        self.default = PolicyState(name=o.policy, params=dict(o.policy_params), by="settings")
        self.state = self.default  # in force on this replica
        self._kv: KeyValue | None = None
        self._sub: Subscription | None = None
        self._follow: asyncio.Task[None] | None = None
        self._watcher: KeyValue.KeyWatcher | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        """Adopt the stored choice, then follow it and answer `<prefix>.admin.policy`."""
        await self.resume()
        self._sub = await self._nc.subscribe(self._settings.subjects.admin_policy,
                                             queue=ADMIN_QUEUE, cb=self._on_admin)
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
            self._kv = await ensure_config_bucket(self._js, self._settings)
            watcher = await self._kv.watch(POLICY_KEY)
            try:
                # The watch delivers the key's current value first, then a None marker.
                while (entry := await asyncio.wait_for(anext(watcher), _WATCH_TIMEOUT_S)):
                    self._adopt_entry(entry)
            except BaseException:
                with contextlib.suppress(Exception):
                    await watcher.stop()
                raise
            self._watcher = watcher
            self._follow = asyncio.create_task(self._follow_updates(watcher), name="policy-watch")

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
            state = policy_state_decoder.decode(entry.value or b"")
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("%s: ignoring the stored policy (revision %s, not a PolicyState: %s); "
                        "keeping %s", self._holder, entry.revision, exc, self.state.name)
            return
        self._adopt(state)

    def _adopt(self, state: PolicyState) -> bool:
        """Put `state` in force here; False (logged, nothing changes) when it does not build."""
        if state == self.state:
            return True  # our own set, seen again through the watch
        try:
            self._apply(state.name, state.params)
        except Exception as exc:  # whatever is stored, the replica keeps running
            log.warning("%s: ignoring the stored policy %r: %s; keeping %s", self._holder,
                        state.name, exc, self.state.name)
            return False
        self.state = state
        return True

    # -- admin requests --------------------------------------------------------------
    async def _on_admin(self, msg: Msg) -> None:
        if not ADMIN_GUARD.admit(msg, self._settings.subjects.admin_policy):
            return  # came sideways (a push consumer aimed here): never applied
        try:
            reply = await self._answer(msg.data)
        except Exception as exc:  # the broker did not answer: say so, the caller may retry
            log.warning("%s: admin policy request failed: %s", self._holder, exc)
            reply = AdminReply(ok=False, error=f"{type(exc).__name__}: {exc}")
        if msg.reply:
            with contextlib.suppress(Exception):
                await self._nc.publish(msg.reply, encode(reply))

    async def _answer(self, data: bytes) -> AdminReply:
        try:
            cmd = policy_command_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return AdminReply(ok=False, error=f"bad admin request: {exc}")
        match cmd:
            case PolicySet():
                return await self._set(cmd)
            case PolicyGet():
                state = await self.stored()
                return AdminReply(ok=True, state=state, router=self.router_of(state))
        raise AssertionError(f"unhandled admin command {cmd!r}")  # the decoder's union

    async def _set(self, cmd: PolicySet) -> AdminReply:
        refused = refusal(self._settings.orchestrator, cmd.name, cmd.params)
        if refused is not None:
            return refused
        state = PolicyState(name=cmd.name, params=dict(cmd.params), updated_ms=time.time() * 1000,
                            by=cmd.by or self._holder)
        kv = self._kv or await ensure_config_bucket(self._js, self._settings)
        await kv.put(POLICY_KEY, encode(state))
        self._adopt(state)  # in force here before the answer; the others follow the watch
        log.info("%s: policy set to %s %s by %s", self._holder, state.name, state.params,
                 state.by)
        return AdminReply(ok=True, state=state, router=self.router_of(state))

    def router_of(self, state: PolicyState) -> str:
        """The router `state`'s policy runs with on this replica."""
        o = self._settings.orchestrator
        try:
            own = policy_order(o, state.name, state.params).router
        except Exception:  # a stored value that does not build: the settings' choice runs
            own = None
        return own.name if own is not None else o.router

    async def stored(self) -> PolicyState:
        """The fleet's choice: the stored one, else this replica's settings. A stored value
        that does not build is ignored by every replica, so the policy in force here is told."""
        kv = self._kv or await ensure_config_bucket(self._js, self._settings)
        try:
            entry = await kv.get(POLICY_KEY)
        except KeyNotFoundError:  # never set, or deleted: the settings rule
            return self.default
        try:
            state = policy_state_decoder.decode(entry.value or b"")
        except (msgspec.DecodeError, msgspec.ValidationError):
            return self.state
        if refusal(self._settings.orchestrator, state.name, state.params) is not None:
            return self.state
        return state


__all__ = ["ADMIN_QUEUE", "POLICY_KEY", "PolicySwitch", "policy_order", "refusal"]
