"""The vLLM engine: vLLM's `AsyncLLM` behind our small Engine protocol.

One `AsyncLLM` per engine, driven from the caller's asyncio loop (its engine
core runs in a child process that vLLM spawns). We tokenize every prompt
ourselves and hand vLLM token ids, because three features need the ids:
the length check, resume (prompt + tokens already streamed), and PD decode
(prompt + the prefill's first token). Long prompts are tokenized on a
thread of our own, never on the loop: a multi-MB prompt takes seconds, and
the worker's heartbeats and in-progress acks run on that loop.

A dead engine core (vLLM's EngineDeadError, or an AsyncLLM that reports
`errored`) surfaces as workers.engines.base.EngineDeadError from generate(),
and `healthy` turns False for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cplane.schemas.blocks import hf_prompt_ids
from cplane.schemas.messages import ErrorCode, FinishReason
from cplane.workers.engines.base import (
    CONNECTOR_KEY,
    Delta,
    EngineDeadError,
    EngineInputError,
    EngineRequest,
    EngineStats,
    KvDelta,
)
from cplane.workers.engines.detok import resume_echo
from cplane.workers.engines.kv_zmq import KvTranslator, ZmqKvEvents
from cplane.workers.engines.vllm.config import VllmSettings, build_engine_args
from cplane.workers.engines.vllm.stats import StatsRecorder, stat_logger_factory

if TYPE_CHECKING:
    from vllm.outputs import RequestOutput
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

# vLLM's finish reasons (str(vllm.v1.engine.FinishReason)) on our wire's.
# "abort" is decided per request (ours → CANCELLED, the engine's → ABORT);
# "error" is an engine fault and raises.
_FINISH = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "repetition": FinishReason.STOP,
}
# Prompts (text or chat contents) up to this many characters are tokenized
# inline: a few ms at most, and their order of arrival is kept. Longer ones go
# to the tokenizer thread so the loop keeps running.
INLINE_TOKENIZE_CHARS = 8192
# The derived character limit (see VllmSettings.max_prompt_chars) allows this
# many times the characters the longest vocabulary entry could cover: a
# margin for normalizers that shrink text (composed accents...).
_PRECHECK_MARGIN = 2


class VllmEngine:
    """Engine protocol over an in-process `AsyncLLM`."""

    name = "vllm"

    @property
    def parallelism(self) -> int:
        """GPUs the engine spans: tensor x pipeline parallel size (heartbeats)."""
        args = self.settings.extra_engine_args
        return (max(1, int(args.get("tensor_parallel_size") or 1))
                * max(1, int(args.get("pipeline_parallel_size") or 1)))

    def __init__(self, settings: VllmSettings) -> None:
        self.settings = settings
        self.models = [settings.model_name]
        self._llm: AsyncLLM | None = None
        self._tokenizer: Any = None
        self._max_model_len = 0
        self._max_token_chars = 0  # longest vocabulary entry, in characters
        self._dead = False
        # One thread: tokenizer calls never overlap, long prompts queue in order.
        self._tokenize_pool: ThreadPoolExecutor | None = None
        self._recorder = StatsRecorder(
            rate_window_s=settings.rate_window_s, prefix_window_s=settings.prefix_window_s
        )
        # request_id -> True once abort() was asked for it.
        self._active: dict[str, bool] = {}
        self.block_tokens = settings.block_size or 16  # the engine's, once started
        self._kv = KvTranslator()
        self._kv_reader: ZmqKvEvents | None = None

    @property
    def llm(self) -> AsyncLLM:
        """The underlying AsyncLLM (tests compare against it directly)."""
        if self._llm is None:
            raise RuntimeError("VllmEngine is not started")
        return self._llm

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def healthy(self) -> bool:
        """True while the engine is started and its engine core is alive.

        Once False (the core died) it stays False: the worker should stop
        pulling work and report itself unhealthy."""
        if self._dead or self._llm is None:
            return False
        try:
            errored = bool(self._llm.errored)
        except Exception:  # vLLM internals gone half-way through a shutdown
            errored = True
        if errored:
            self._dead = True
        return not errored

    async def start(self) -> None:
        """Build the engine (seconds to minutes); idempotent."""
        if self._llm is not None:
            return
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        endpoint = None
        if self.settings.kv_events and self.settings.enable_prefix_caching:
            sock = Path(tempfile.gettempdir()) / f"cplane-kv-{uuid.uuid4().hex[:12]}.sock"
            endpoint = f"ipc://{sock}"
        args = build_engine_args(self.settings, endpoint)
        logger_cls = stat_logger_factory(
            self._recorder, replace_prometheus=not self.settings.vllm_prometheus
        )

        def build() -> AsyncLLM:
            vllm_config = args.create_engine_config(UsageContext.ENGINE_CONTEXT)
            # Our logger alone forces stats on; disable_log_stats only drops
            # vLLM's LoggingStatLogger, which nobody would ever flush.
            return AsyncLLM.from_vllm_config(
                vllm_config, stat_loggers=[logger_cls], disable_log_stats=True
            )

        # Start-up blocks for the whole model load: keep the loop (and the
        # worker's heartbeats) alive meanwhile. AsyncLLM starts its output
        # handler lazily on the first request when built off-loop.
        # No local holds the AsyncLLM: a traceback vLLM keeps from an import
        # in get_supported_tasks() pins this frame, and shutdown() must be
        # able to drop the last reference.
        self._llm = await asyncio.to_thread(build)
        self._tokenizer = self._llm.get_tokenizer()
        self.block_tokens = self._llm.vllm_config.cache_config.block_size
        if endpoint is not None:
            self._kv_reader = ZmqKvEvents(endpoint, self._kv)
            self._kv_reader.start()
        self._max_model_len = self._llm.model_config.max_model_len
        self._max_token_chars = _max_token_chars(self._tokenizer)
        self._tokenize_pool = ThreadPoolExecutor(1, thread_name_prefix="vllm-tokenize")
        # Cached from here on, so submitting a request never suspends before
        # vLLM registers it (see generate: abort must never miss a request).
        await self._llm.get_supported_tasks()

    def kv_events(self) -> KvDelta | None:
        return self._kv.drain()

    def kv_blocks(self) -> list[int]:
        return self._kv.blocks()

    def prefix_counts(self) -> tuple[int, int]:
        """vLLM's own prefix-cache counters since start: (tokens queried, hit)."""
        return self._recorder.prefix_queries_total, self._recorder.prefix_hits_total

    async def shutdown(self) -> None:
        """Stop the engine core process; idempotent."""
        llm, self._llm = self._llm, None
        if llm is None:
            return
        reader, self._kv_reader = self._kv_reader, None
        if reader is not None:
            await reader.stop()
        if self._active:
            # Requests still running end with ABORT (not ours to hand back):
            # vLLM queues their final outputs synchronously, handler or not.
            await llm.abort(list(self._active))
        # Stop the output handler before the engine core dies under it:
        # otherwise it logs EngineDeadError while shutdown() runs in a thread.
        handler = llm.output_handler
        if handler is not None:
            handler.cancel()
            await asyncio.gather(handler, return_exceptions=True)
        pool, self._tokenize_pool = self._tokenize_pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(llm.shutdown)

    @property
    def scheduler_counts(self) -> tuple[int, int]:
        """(running, waiting) as vLLM's scheduler last reported them, uncorrected."""
        return self._recorder.running, self._recorder.waiting

    def stats(self) -> EngineStats:
        return self._recorder.snapshot(active_requests=len(self._active))

    async def abort(self, request_id: str) -> None:
        """Stop a request; its generate() then ends with CANCELLED.

        Unknown or finished ids are ignored."""
        if request_id not in self._active:
            return
        self._active[request_id] = True
        if self._llm is not None:
            await self._llm.abort(request_id)

    async def generate(self, req: EngineRequest) -> AsyncIterator[Delta]:
        """Yield deltas until one carries finish_reason (see Engine.generate)."""
        llm = self.llm
        rid = req.request_id
        if rid in self._active:
            raise EngineInputError(f"request {rid} is already running")
        if not self.healthy:
            raise EngineDeadError(f"vLLM engine of {self.settings.model_name} is dead")
        # Registered before tokenizing (which may suspend): an abort() that
        # comes meanwhile is remembered, and the request never reaches vLLM.
        self._active[rid] = False
        inner = self._generate(llm, req)
        try:
            async for delta in inner:
                yield delta
        finally:
            try:
                await inner.aclose()  # its own cleanup now, not at GC
            finally:
                self._active.pop(rid, None)

    async def _generate(self, llm: AsyncLLM, req: EngineRequest) -> AsyncGenerator[Delta, None]:
        rid = req.request_id
        prompt_ids = await self._prompt_ids(req)
        engine_ids = prompt_ids + list(req.resume_token_ids)
        self._check_length(req, len(prompt_ids), len(engine_ids), req.max_tokens)
        max_tokens = 1 if req.prefill_only else req.max_tokens - len(req.resume_token_ids)
        if max_tokens <= 0 or self._active.get(rid):
            # Everything was streamed before a migration, or aborted while
            # the prompt was being tokenized.
            reason = FinishReason.CANCELLED if self._active.get(rid) else FinishReason.LENGTH
            yield Delta(
                token_ids=[],
                finish_reason=reason,
                prompt_tokens=len(prompt_ids),
                cached_prompt_tokens=0,
            )
            return
        params = self._sampling_params(req, max_tokens)
        kwargs: dict[str, Any] = {}
        if self.settings.scheduling_policy == "priority":
            kwargs["priority"] = req.priority

        from vllm.exceptions import VLLMClientError
        from vllm.inputs.engine import tokens_input

        # Text vLLM wrongly repeats on a resumed request (see detok.resume_echo).
        echo = (
            resume_echo(self._tokenizer, engine_ids, len(prompt_ids))
            if req.resume_token_ids
            else None
        )
        # No await between the abort check above and vLLM registering the
        # request (supported tasks are cached): an abort() can never fall in
        # between.
        stream = llm.generate(tokens_input(engine_ids), params, rid, **kwargs)
        finished = False
        try:
            final: Delta | None = None
            try:
                async for out in stream:
                    delta = self._delta(out, req, len(prompt_ids))
                    if echo is not None and delta.text:
                        delta.text = delta.text.removeprefix(echo)
                        echo = None
                    if delta.finish_reason is None:
                        yield delta
                    else:  # vLLM's stream ends right after its finished output
                        final = delta
            except VLLMClientError as e:  # vLLM's own input validation
                code = (
                    ErrorCode.PROMPT_TOO_LONG
                    if "maximum model length" in str(e)
                    else ErrorCode.INVALID_REQUEST
                )
                raise EngineInputError(str(e), code=code) from e
            except Exception as e:
                dead = self.dead_error(e, llm)
                if dead is not None:
                    raise dead from e
                raise
            if final is None:
                raise RuntimeError(f"vLLM stream of {rid} ended without finishing")
            finished = True
            yield final
        finally:
            if not finished:
                # The consumer went away (aclose, task cancelled) or vLLM
                # raised: free the request's KV blocks now, not at GC.
                with contextlib.suppress(Exception):
                    await stream.aclose()
                with contextlib.suppress(Exception):
                    await llm.abort(rid)

    def dead_error(self, exc: BaseException, llm: Any = None) -> EngineDeadError | None:
        """Our EngineDeadError for `exc` when it (or the engine's state) says the
        engine core is gone, else None (an ordinary, possibly retryable fault).

        vLLM raises its own EngineDeadError once the core died; a request
        that failed otherwise (EngineGenerateError) on an engine that now
        reports `errored` is a death too. Marks this engine unhealthy."""
        from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDeadError

        dead = isinstance(exc, VllmEngineDeadError)
        if not dead and llm is not None:
            try:
                dead = bool(llm.errored)
            except Exception:
                dead = False
        if not dead:
            return None
        self._dead = True
        name = self.settings.model_name
        return EngineDeadError(f"vLLM engine of {name} died: {type(exc).__name__}: {exc}")

    def _check_length(
        self, req: EngineRequest, prompt_len: int, engine_len: int, max_tokens: int
    ) -> None:
        """prompt_too_long unless the prompt is within the worker's limit and
        prompt + max_tokens (resumed included) fits the model."""
        if 0 < req.max_prompt_tokens < prompt_len:
            raise EngineInputError(
                f"prompt has {prompt_len} tokens, more than {req.max_prompt_tokens}",
                code=ErrorCode.PROMPT_TOO_LONG,
            )
        limit = self._max_model_len
        if engine_len >= limit or prompt_len + max_tokens > limit:
            raise EngineInputError(
                f"prompt has {prompt_len} tokens and max_tokens is {max_tokens}: "
                f"{prompt_len + max_tokens} > {limit}, this model's max_model_len",
                code=ErrorCode.PROMPT_TOO_LONG,
            )

    def _char_limit(self, req: EngineRequest) -> int:
        """Most prompt characters that could still fit, or 0 for no limit."""
        configured = self.settings.max_prompt_chars
        if configured is not None:
            return configured
        if self._max_token_chars <= 0:
            return 0
        room = max(self._max_model_len - req.max_tokens, 0)
        if req.max_prompt_tokens > 0:
            room = min(room, req.max_prompt_tokens)
        return max(room * self._max_token_chars * _PRECHECK_MARGIN, 1)

    async def _prompt_ids(self, req: EngineRequest) -> list[int]:
        """Token ids of the request's prompt (text, ids or chat messages).

        Long texts are tokenized on the tokenizer thread; texts that cannot
        fit whatever their tokens are refused without tokenizing."""
        given = [x is not None for x in (req.prompt, req.prompt_token_ids, req.messages)]
        if sum(given) != 1:
            raise EngineInputError("give exactly one of prompt, prompt_token_ids, messages")
        if req.prompt_token_ids is not None:
            ids = list(req.prompt_token_ids)  # vLLM checks them against the vocab
            if not ids:
                raise EngineInputError("empty prompt")
            return ids
        if req.messages is not None and not req.messages:
            raise EngineInputError("messages is empty")
        chars = (
            len(req.prompt)
            if req.prompt is not None
            else sum(len(m.content) + len(m.role) for m in req.messages or [])
        )
        limit = self._char_limit(req)
        if limit and chars > limit:
            raise EngineInputError(
                f"prompt has {chars} characters; with max_tokens {req.max_tokens} this model "
                f"(max_model_len {self._max_model_len}) takes at most {limit}",
                code=ErrorCode.PROMPT_TOO_LONG,
            )
        if chars <= INLINE_TOKENIZE_CHARS or self._tokenize_pool is None:
            return self._text_ids(req)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenize_pool, self._text_ids, req)

    def _text_ids(self, req: EngineRequest) -> list[int]:
        """Tokenize a text or chat prompt (runs on the loop or the tokenizer thread),
        exactly as precise prefix routers hash it (schemas/blocks.py)."""
        try:
            ids = hf_prompt_ids(self._tokenizer, req.prompt, req.messages)
        except ValueError as e:
            raise EngineInputError(str(e)) from e
        if not ids:
            raise EngineInputError("empty prompt")
        return ids

    def _sampling_params(self, req: EngineRequest, max_tokens: int) -> SamplingParams:
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        extra: dict[str, Any] | None = None
        if req.prefill_only:
            extra = {"kv_transfer_params": {"do_remote_decode": True}}
        elif req.kv_transfer_params and "do_remote_prefill" in req.kv_transfer_params:
            # A connector's own params (NIXL): it pulls the KV with them. Our
            # marker dict (ExampleConnector) needs nothing: the KV is found by
            # the hash of the prompt in the shared directory.
            extra = {"kv_transfer_params": dict(req.kv_transfer_params)}
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=req.temperature,
                top_p=req.top_p,
                top_k=0 if req.top_k < 0 else req.top_k,  # both mean "off"
                stop=list(req.stop) if req.stop else None,
                seed=req.seed,
                ignore_eos=req.ignore_eos,
                output_kind=RequestOutputKind.DELTA,
                extra_args=extra,
            )
        except (VLLMClientError, ValueError) as e:  # vLLM checks ranges (temperature < 0...)
            raise EngineInputError(str(e)) from e

    def _delta(self, out: RequestOutput, req: EngineRequest, prompt_len: int) -> Delta:
        comp = out.outputs[0]
        delta = Delta(token_ids=list(comp.token_ids), text=comp.text)
        if not out.finished:
            return delta
        reason = comp.finish_reason or "stop"
        if reason == "error":
            raise RuntimeError(f"vLLM failed request {req.request_id} ({comp.stop_reason})")
        if reason == "abort":
            cancelled = self._active.get(req.request_id, False)
            delta.finish_reason = FinishReason.CANCELLED if cancelled else FinishReason.ABORT
        else:
            delta.finish_reason = _FINISH.get(reason, FinishReason.STOP)
        delta.prompt_tokens = prompt_len
        # vLLM counts over prompt + resumed tokens; we report the prompt's share.
        delta.cached_prompt_tokens = min(out.num_cached_tokens or 0, prompt_len)
        if req.prefill_only:
            delta.kv_transfer_params = out.kv_transfer_params or {
                CONNECTOR_KEY: self.settings.kv_connector or "none"
            }
        return delta


def _max_token_chars(tokenizer: Any) -> int:
    """Characters of the longest vocabulary entry (0 when unknown).

    A token covers at most this many characters of text (byte-level BPE
    entries spell one character per byte; SentencePiece ones one per
    character), so a text of n characters has at least n / this tokens."""
    try:
        vocab = tokenizer.get_vocab()
        return max((len(str(k)) for k in vocab), default=0)
    except Exception:
        return 0
