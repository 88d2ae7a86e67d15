"""VllmEngine limits and health: prompt length, tokenization off the loop, a dead engine.

Real vLLM (CPU wheel) where an engine is needed (session fixtures); a fake
AsyncLLM behind a real VllmEngine for the dead-engine paths.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import pytest
import vllm  # noqa: F401 - these tests fail, never skip, where vLLM is missing

from cplane.schemas.messages import ChatMessage, ErrorCode, FinishReason
from cplane.workers.engines.base import EngineDeadError, EngineInputError
from cplane.workers.engines.vllm import VllmEngine, VllmSettings
from cplane.workers.engines.vllm.engine import INLINE_TOKENIZE_CHARS
from tests.vllm.test_vllm_engine import collect, greedy, prompt_ids, rid
from tests.waiting import until

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(240)]

async def test_vllm_prompt_plus_max_tokens_must_fit(vllm_engine: VllmEngine) -> None:
    """prompt + max_tokens (resumed tokens included) > max_model_len is refused
    up front; vLLM itself would only stop early with `length`."""
    limit = vllm_engine.max_model_len
    ids = prompt_ids(15, 300)
    over = greedy(rid("fit"), prompt_token_ids=ids, max_tokens=limit - 300 + 1)
    with pytest.raises(EngineInputError) as err:
        await collect(vllm_engine.generate(over))
    assert err.value.code == ErrorCode.PROMPT_TOO_LONG
    assert "max_tokens" in str(err.value)
    # The worker's own prompt limit (WorkerSettings.max_prompt_tokens).
    capped = greedy(rid("fit"), prompt_token_ids=ids, max_tokens=8, max_prompt_tokens=299)
    with pytest.raises(EngineInputError) as err:
        await collect(vllm_engine.generate(capped))
    assert err.value.code == ErrorCode.PROMPT_TOO_LONG
    # Exactly fitting runs (the first delta is enough to know).
    fits = vllm_engine.generate(greedy(rid("fit"), prompt_token_ids=ids, max_tokens=limit - 300))
    first = await anext(fits)
    assert first.token_ids
    await fits.aclose()  # type: ignore[attr-defined]
    assert vllm_engine.llm.get_num_unfinished_requests() == 0


async def _ticking(work: Any) -> tuple[Any, float]:
    """Run `work` while a task ticks every 50 ms: (its outcome, the longest gap)."""
    gaps: list[float] = []
    done = asyncio.Event()

    async def tick() -> None:
        last = time.monotonic()
        while not done.is_set():
            await asyncio.sleep(0.05)  # the tick period: the measurement itself
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.1)  # a baseline of ticks before `work` (measured, not waited on)
    try:
        outcome: Any = await work
    except Exception as e:
        outcome = e
    done.set()
    await ticker
    return outcome, max(gaps)


async def test_vllm_large_prompt_is_tokenized_off_the_loop(
    vllm_engine: VllmEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 50_000  # 2.25 MB
    # Default: the text cannot fit whatever its tokens, refused before tokenizing.
    t0 = time.monotonic()
    with pytest.raises(EngineInputError) as err:
        await collect(vllm_engine.generate(greedy(rid("big"), prompt=text, max_tokens=8)))
    assert err.value.code == ErrorCode.PROMPT_TOO_LONG and "characters" in str(err.value)
    assert time.monotonic() - t0 < 0.5
    # Without the character limit the whole text is tokenized (seconds), on
    # the tokenizer thread: the loop keeps ticking meanwhile.
    monkeypatch.setattr(vllm_engine, "settings", replace(vllm_engine.settings, max_prompt_chars=0))
    t0 = time.monotonic()
    outcome, max_gap = await _ticking(
        collect(vllm_engine.generate(greedy(rid("big"), prompt=text, max_tokens=8)))
    )
    took = time.monotonic() - t0
    assert isinstance(outcome, EngineInputError), outcome
    assert outcome.code == ErrorCode.PROMPT_TOO_LONG and "tokens" in str(outcome)
    assert took > 0.5, "tokenizing 2 MB took no time: was it tokenized at all?"
    assert max_gap < 0.5, f"the loop stalled {max_gap:.2f} s while tokenizing ({took:.1f} s)"
    # Chat contents go the same way.
    msgs = [ChatMessage(role="user", content=text)]
    outcome, max_gap = await _ticking(
        collect(vllm_engine.generate(greedy(rid("big"), messages=msgs, max_tokens=8)))
    )
    assert isinstance(outcome, EngineInputError) and outcome.code == ErrorCode.PROMPT_TOO_LONG
    assert max_gap < 0.5, f"the loop stalled {max_gap:.2f} s applying the chat template"
    assert vllm_engine.stats().running == 0


# -- without an engine core: a fake AsyncLLM behind a real VllmEngine ---------


class _FakeTokenizer:
    """Encodes one id per character, slowly when asked (the tokenizer thread)."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.threads: list[str] = []
        self._tokenizer = None  # no `tokenizers` object: no resume echo

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.threads.append(threading.current_thread().name)
        time.sleep(self.delay_s)  # the slow tokenizer under test (in its own thread)
        return [3 + ord(c) % 400 for c in text]

    def get_vocab(self) -> dict[str, int]:
        return {"a": 3, "abc": 4}


class _FakeLLM:
    """What VllmEngine uses of AsyncLLM; `fail` is raised on a request's first step."""

    def __init__(self, fail: BaseException | None = None, dies: bool = False) -> None:
        self.fail = fail
        self.dies = dies  # the core dies with the failure: `errored` turns True
        self.errored = False
        self.requests: list[str] = []
        self.aborted: list[Any] = []

    async def generate(self, inputs: Any, params: Any, request_id: str, **kw: Any) -> Any:
        from vllm.outputs import CompletionOutput, RequestOutput

        self.requests.append(request_id)
        if self.fail is not None:
            self.errored = self.dies
            raise self.fail
        done = CompletionOutput(index=0, text="x", token_ids=[7], cumulative_logprob=None,
                                logprobs=None, finish_reason="length")
        yield RequestOutput(request_id=request_id, prompt=None, prompt_token_ids=[],
                            prompt_logprobs=None, outputs=[done], finished=True)

    async def abort(self, request_id: Any, internal: bool = False) -> None:
        self.aborted.append(request_id)


def _fake_engine(llm: _FakeLLM, tok: _FakeTokenizer | None = None) -> VllmEngine:
    engine = VllmEngine(VllmSettings(model="fake", max_prompt_chars=0))
    engine._llm = llm  # type: ignore[assignment]
    engine._tokenizer = tok or _FakeTokenizer()
    engine._max_model_len = 1 << 20
    engine._tokenize_pool = ThreadPoolExecutor(1, thread_name_prefix="vllm-tokenize")
    return engine


async def test_vllm_dead_engine_core_raises_engine_dead_error() -> None:
    from vllm.v1.engine.exceptions import EngineDeadError as VllmDead
    from vllm.v1.engine.exceptions import EngineGenerateError

    # The mapping itself.
    engine = _fake_engine(_FakeLLM())
    assert engine.healthy
    assert engine.dead_error(RuntimeError("transient"), engine.llm) is None
    assert engine.healthy
    mapped = engine.dead_error(VllmDead(), engine.llm)
    assert isinstance(mapped, EngineDeadError) and not engine.healthy

    # vLLM's EngineDeadError out of a request: ours, and the engine stays dead.
    llm = _FakeLLM(fail=VllmDead())
    engine = _fake_engine(llm)
    with pytest.raises(EngineDeadError):
        await collect(engine.generate(greedy(rid("dead"), prompt_token_ids=[5, 6])))
    assert not engine.healthy and engine.stats().running == 0
    llm.fail = None  # even if vLLM answered again: the engine is not trusted
    with pytest.raises(EngineDeadError):
        await collect(engine.generate(greedy(rid("dead"), prompt_token_ids=[5, 6])))
    assert len(llm.requests) == 1

    # A failed request on an AsyncLLM that now reports `errored` is a death too.
    llm = _FakeLLM(fail=EngineGenerateError(), dies=True)
    engine = _fake_engine(llm)
    with pytest.raises(EngineDeadError):
        await collect(engine.generate(greedy(rid("dead"), prompt_token_ids=[5, 6])))
    assert not engine.healthy
    # An AsyncLLM already errored gets no request at all.
    llm = _FakeLLM()
    engine = _fake_engine(llm)
    llm.errored = True
    with pytest.raises(EngineDeadError):
        await collect(engine.generate(greedy(rid("dead"), prompt_token_ids=[5, 6])))
    assert llm.requests == [] and not engine.healthy

    # The same failure on a live AsyncLLM is an ordinary engine fault.
    llm = _FakeLLM(fail=EngineGenerateError())
    engine = _fake_engine(llm)
    with pytest.raises(EngineGenerateError):
        await collect(engine.generate(greedy(rid("flaky"), prompt_token_ids=[5, 6])))
    assert engine.healthy
    tokens, _, last = await collect(
        _fake_engine(_FakeLLM()).generate(greedy(rid("ok"), prompt_token_ids=[5], max_tokens=4))
    )
    assert tokens == [7] and last.finish_reason == FinishReason.LENGTH


async def test_vllm_abort_while_tokenizing_never_reaches_vllm() -> None:
    tok = _FakeTokenizer(delay_s=0.5)
    llm = _FakeLLM()
    engine = _fake_engine(llm, tok)
    text = "y" * (INLINE_TOKENIZE_CHARS + 1)
    req = greedy(rid("tok"), prompt=text, max_tokens=4)
    task = asyncio.create_task(collect(engine.generate(req)))
    await until(lambda: tok.threads, 5, "the tokenizer thread to start")  # inside it (0.5 s)
    await engine.abort(req.request_id)
    tokens, _, last = await task
    assert tokens == [] and last.finish_reason == FinishReason.CANCELLED
    assert llm.requests == [] and not engine._active
    assert tok.threads == ["vllm-tokenize_0"]
    # Short prompts stay on the loop (no thread hop, order kept).
    await collect(engine.generate(greedy(rid("tok"), prompt="short", max_tokens=4)))
    assert tok.threads[-1] == threading.current_thread().name
