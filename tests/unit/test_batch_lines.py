"""Batch jobs, the pure parts: line checks, request ids, output lines, job states,
and the policy rule that keeps batch lines to spare capacity."""

from __future__ import annotations

import msgspec
import pytest

from cplane.client.batch_lines import (
    CANCELLED_CODE,
    LineChecker,
    LineError,
    ValidLine,
    output_line,
    request_id_for,
)
from cplane.client.batch_state import Resubmit, all_in, job_id_for, on_resubmit, transition
from cplane.orchestrator.fleet import FleetView
from cplane.orchestrator.plugins import build_policy
from cplane.orchestrator.snapshot import Pending, PolicyContext
from cplane.schemas.batch import BatchJob, JobState
from cplane.schemas.messages import ErrorCode, ErrorReply, Final, FinishReason, Usage
from cplane.schemas.settings import LimitsSettings
from cplane.schemas.subjects import valid_token


def line(cid: str = "q1", url: str = "/v1/chat/completions", **body: object) -> bytes:
    b: dict[str, object] = {"model": "sim", **body}
    if url.endswith("chat/completions") and "messages" not in b:
        b["messages"] = [{"role": "user", "content": "hi"}]
    if url.endswith("/completions") and "chat" not in url and "prompt" not in b:
        b["prompt"] = "hi"
    return msgspec.json.encode({"custom_id": cid, "method": "POST", "url": url, "body": b})


def check(raw: bytes, **kw: object) -> ValidLine | LineError:
    return LineChecker("batch_x", **kw).check(raw, 1)  # type: ignore[arg-type]


def test_a_chat_line_becomes_a_request_of_the_job() -> None:
    v = check(line(max_tokens=6, temperature=0.5, stop="\n", seed=3, user="u1"))
    assert isinstance(v, ValidLine)
    r = v.request
    assert (r.group, r.model, r.max_tokens, r.temperature, r.stop, r.seed, r.user_id) == (
        "batch_x", "sim", 6, 0.5, ["\n"], 3, "u1")
    assert r.messages is not None and r.messages[0].content == "hi"
    assert r.request_id == request_id_for("batch_x", "q1")


def test_completion_lines_take_text_or_token_prompts_and_text_parts() -> None:
    v = check(line(url="/v1/completions", prompt=["one prompt"]))
    assert isinstance(v, ValidLine) and v.request.prompt == "one prompt"
    v = check(line(url="/v1/completions", prompt=[1, 2, 3]))
    assert isinstance(v, ValidLine) and v.request.prompt_token_ids == [1, 2, 3]
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"},
                                          {"type": "text", "text": "b"}]}]
    v = check(line(messages=parts, max_completion_tokens=9))
    assert isinstance(v, ValidLine) and v.request.messages is not None
    assert (v.request.messages[0].content, v.request.max_tokens) == ("ab", 9)


@pytest.mark.parametrize(("raw", "reason"), [
    (b"not json at all", "not JSON"),
    (b'{"custom_id": "a"}', "not an OpenAI batch line"),
    (b'["a list"]', "not an OpenAI batch line"),
    (msgspec.json.encode({"custom_id": 5, "method": "POST", "url": "/v1/completions",
                          "body": {}}), "not an OpenAI batch line"),
    (line(url="/v1/embeddings"), "url must be one of"),
    (msgspec.json.encode({"custom_id": "a", "method": "GET", "url": "/v1/completions",
                          "body": {"model": "m", "prompt": "x"}}), "method must be POST"),
    (line(model=""), "body.model is missing"),
    (line(messages=[]), "body.messages must be a non-empty list"),
    (line(messages=[{"content": "no role"}]), "string role"),
    (line(url="/v1/completions", prompt=["a", "b"]), "one prompt per line"),
    (line(n=2), "body.n must be 1"),
    (line(stream=True), "body.stream must be false"),
    (line(max_tokens=0), "body.max_tokens must be an integer"),
    (line(max_tokens=10**9), "body.max_tokens must be an integer"),
    (line(temperature="hot"), "body.temperature must be a number"),
    (line(stop=[1]), "body.stop must be a string"),
    (line(cid=""), "custom_id must be a non-empty string"),
])
def test_bad_lines_are_refused_with_a_reason(raw: bytes, reason: str) -> None:
    v = check(raw)
    assert isinstance(v, LineError) and reason in v.reason, v
    assert str(v).startswith("line 1: ")


def test_model_override_repeats_and_size_limit() -> None:
    v = check(line(model=""), model="other")
    assert isinstance(v, ValidLine) and v.request.model == "other"
    c = LineChecker("batch_x")
    assert isinstance(c.check(line("a"), 1), ValidLine)
    again = c.check(line("a"), 7)
    assert isinstance(again, LineError) and "repeats line 1" in again.reason
    assert again.custom_id == "a"
    big = check(line(messages=[{"role": "user", "content": "x" * 5000}]), max_bytes=1000)
    assert isinstance(big, LineError) and "larger than 1000 bytes" in big.reason
    few = check(line(stop=["a", "b", "c"]), limits=LimitsSettings(max_stop=2))
    assert isinstance(few, LineError) and "at most 2" in few.reason


def test_request_ids_are_tokens_derived_from_job_and_custom_id() -> None:
    odd = "a.b c*>/ü"
    rid = request_id_for("batch_1", odd)
    assert valid_token(rid) and rid.startswith("batch_1-")
    assert rid == request_id_for("batch_1", odd) != request_id_for("batch_2", odd)
    assert request_id_for("batch_1", "a") != request_id_for("batch_1", "b")
    assert job_id_for(b"d", "m") == job_id_for(b"d", "m") != job_id_for(b"d", "n")
    assert valid_token(job_id_for(b"d"))


def _valid(url: str = "/v1/chat/completions") -> ValidLine:
    v = check(line(url=url))
    assert isinstance(v, ValidLine)
    return v


def test_output_lines_in_openai_shape() -> None:
    v = _valid()
    rid = v.request.request_id
    fin = Final(request_id=rid, finish_reason=FinishReason.LENGTH, text="hello", model="sim",
                usage=Usage(prompt_tokens=3, completion_tokens=2), ts_ms=1_700_000_000_000)
    ok, out = output_line(v, fin)
    d = msgspec.to_builtins(out)
    assert ok and d["error"] is None and d["custom_id"] == "q1"
    assert d["response"]["status_code"] == 200 and d["response"]["request_id"] == rid
    body = d["response"]["body"]
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hello"}
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    ok, out = output_line(_valid("/v1/completions"), fin)
    assert ok and msgspec.to_builtins(out)["response"]["body"]["choices"][0]["text"] == "hello"
    # nulls stay on the wire, as in OpenAI's files
    assert b'"error":null' in msgspec.json.encode(output_line(v, fin)[1])


def test_errors_and_cancellations_go_to_the_errors_file() -> None:
    v = _valid()
    rid = v.request.request_id
    ok, out = output_line(v, ErrorReply(request_id=rid, code=ErrorCode.UNKNOWN_MODEL,
                                        message="no such model"))
    d = msgspec.to_builtins(out)
    assert not ok and d["response"]["status_code"] == 404
    assert d["error"] == {"code": "unknown_model", "message": "no such model"}
    ok, out = output_line(v, Final(request_id=rid, finish_reason=FinishReason.CANCELLED))
    assert not ok and out.error is not None and out.error.code == CANCELLED_CODE


def job(state: JobState, **kw: object) -> BatchJob:
    return BatchJob(id="batch_x", state=state, total=10, **kw)  # type: ignore[arg-type]


def test_job_states_move_only_forward() -> None:
    j = transition(job(JobState.VALIDATING), JobState.IN_PROGRESS, 1.0)
    j = transition(j, JobState.CANCELLING, 2.0)
    with pytest.raises(ValueError, match="cannot become completed"):
        transition(j, JobState.COMPLETED, 3.0)
    j = transition(transition(j, JobState.FINALIZING, 3.0), JobState.CANCELLED, 4.0)
    assert (j.state, j.finished_ms, j.updated_ms) == (JobState.CANCELLED, 4.0, 4.0)
    with pytest.raises(ValueError):
        transition(j, JobState.IN_PROGRESS, 5.0)


def test_a_job_is_done_when_its_expected_results_are_in() -> None:
    assert not all_in(job(JobState.IN_PROGRESS), 9)
    assert all_in(job(JobState.IN_PROGRESS), 10)
    # a cancel waits for the publisher to say how many went out, then for those
    assert not all_in(job(JobState.CANCELLING, published=4), 4)
    assert all_in(job(JobState.CANCELLING, published=4, publishing_done=True), 4)
    assert not all_in(job(JobState.COMPLETED), 10)


def test_what_a_resubmit_does() -> None:
    assert on_resubmit(job(JobState.IN_PROGRESS, published=3)) is Resubmit.PUBLISH
    assert on_resubmit(job(JobState.IN_PROGRESS, published=10,
                           publishing_done=True)) is Resubmit.COLLECT
    assert on_resubmit(job(JobState.COMPLETED)) is Resubmit.DONE
    assert on_resubmit(job(JobState.CANCELLED)) is Resubmit.REFUSE


def pending(rid: str, level: int, arrival: float, slo: str) -> Pending:
    return Pending(request_id=rid, level=level, arrival_ms=arrival, held_ms=arrival, model="",
                   prompt_tokens=10, slo_class=slo)


@pytest.mark.parametrize("policy", ["priority", "fifo", "cost_optimized"])
def test_batch_lines_take_only_the_room_other_work_leaves(policy: str) -> None:
    now = 1_000_000.0
    order = build_policy(policy, {"aging_s": 1.0} if policy != "fifo" else {})
    old_batch = pending("b", 4, now - 600_000, "batch")  # waited 10 min: 600 aging steps
    fresh = pending("i", 2, now - 1, "interactive")
    levels = ((), (), (fresh,), (), (old_batch,))
    ctx = PolicyContext(now_ms=now, fleet=FleetView(workers=()), room=1)
    assert [p.request_id for p in order(levels, 1, ctx)] == ["i"]
    assert [p.request_id for p in order(levels, 2, ctx)] == ["i", "b"]
    # Other background work still ages past fresh requests (nothing else starves).
    if policy != "fifo":
        old_bg = pending("g", 4, now - 600_000, "standard")
        assert order(((), (), (fresh,), (), (old_bg,)), 1, ctx)[0].request_id == "g"
