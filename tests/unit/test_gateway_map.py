"""The gateway's pure parts with plain asserts: OpenAI bodies <-> wire types, SSE, API keys."""

from __future__ import annotations

import json

import msgspec

from cplane.gateway import openai_map as om
from cplane.gateway import sse
from cplane.gateway.auth import tenant_for
from cplane.gateway.models import Seen, live_models, model_list
from cplane.schemas.messages import (
    ChatMessage,
    ErrorCode,
    ErrorReply,
    Final,
    FinishReason,
    Heartbeat,
    Priority,
    Role,
    TokenChunk,
    Usage,
    WorkerState,
)


def _chat(body: dict[str, object], **headers: str) -> om.Mapped | om.ApiError:
    return om.parse(om.Kind.CHAT, json.dumps(body).encode(), request_id="r1", headers=headers)


def _completion(body: dict[str, object], **headers: str) -> om.Mapped | om.ApiError:
    return om.parse(om.Kind.COMPLETION, json.dumps(body).encode(), request_id="r1",
                    headers=headers)


def _ok(m: om.Mapped | om.ApiError) -> om.Mapped:
    assert isinstance(m, om.Mapped), m
    return m


def _err(m: om.Mapped | om.ApiError) -> om.ApiError:
    assert isinstance(m, om.ApiError), m
    return m


def test_chat_body_becomes_one_request_with_sampling_and_schedule() -> None:
    m = _ok(_chat({"model": "tiny", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "he"}, {"type": "text", "text": "llo"}]},
    ], "max_completion_tokens": 7, "temperature": 0, "top_p": 0.5, "seed": 3, "stop": "\n",
        "stream": True, "stream_options": {"include_usage": True}, "user": "u1",
        "priority": -1, "slo_class": "interactive", "some_unknown_field": [1, 2]}))
    r = m.request
    assert r.request_id == "r1" and r.model == "tiny"
    assert r.messages == [ChatMessage(role="system", content="be brief"),
                          ChatMessage(role="user", content="hello")]
    assert (r.max_tokens, r.temperature, r.top_p, r.seed, r.stop) == (7, 0.0, 0.5, 3, ["\n"])
    assert r.user_id == "u1" and r.tenant is None
    assert m.priority is Priority.HIGH and r.priority is Priority.HIGH
    assert m.slo_class == "interactive" == r.slo_class
    assert m.stream and m.include_usage and m.kind is om.Kind.CHAT


def test_completion_prompt_forms_and_defaults() -> None:
    m = _ok(_completion({"model": "", "prompt": "hi"}))
    assert m.request.prompt == "hi" and m.request.max_tokens == 256  # Request's default
    assert not m.stream and not m.include_usage and m.priority is Priority.NORMAL
    assert m.slo_class is None
    assert _ok(_completion({"prompt": ["hi"]})).request.prompt == "hi"
    assert _ok(_completion({"prompt": [5, 6, 7]})).request.prompt_token_ids == [5, 6, 7]
    assert _ok(_completion({"prompt": [[5, 6]]})).request.prompt_token_ids == [5, 6]
    assert _err(_completion({"prompt": ["a", "b"]})).param == "prompt"
    assert _err(_completion({"prompt": []})).param == "prompt"
    assert _err(_completion({"prompt": 3})).param == "prompt"
    assert _ok(_completion({"prompt": "x", "max_tokens": 9})).request.max_tokens == 9


def test_priority_from_vllm_ints_names_and_headers() -> None:
    levels = {-5: "critical", -2: "critical", -1: "high", 0: "normal", 1: "low", 2: "background",
              9: "background"}
    for value, name in levels.items():
        assert om.priority_of(value) is Priority(name)
    assert om.priority_of("high") is Priority.HIGH and om.priority_of(" LOW ") is Priority.LOW
    assert om.priority_of("-1") is Priority.HIGH and om.priority_of(None) is Priority.NORMAL
    assert isinstance(om.priority_of("urgent"), om.ApiError)
    assert isinstance(om.priority_of(True), om.ApiError)
    # The header wins over the body (a proxy in front sets it per route).
    m = _ok(_chat({"messages": [{"role": "user", "content": "x"}], "priority": 2},
                  **{"x-priority": "critical", "x-slo-class": "batch"}))
    assert m.priority is Priority.CRITICAL and m.slo_class == "batch"


def test_bad_bodies_are_400_with_openai_shape_and_the_field_named() -> None:
    e = _err(om.parse(om.Kind.CHAT, b"{not json", request_id="r", headers={}))
    assert e.status == 400 and "not JSON" in e.message
    body = e.body()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    assert _err(_chat({"model": "m"})).param == "messages"  # required field missing
    assert _err(_chat({"messages": "hi"})).param == "messages"
    assert _err(_chat({"messages": [{"role": "user", "content": "x"}], "max_tokens": "5"})
                ).param == "max_tokens"
    cases = {
        "n": {"n": 2}, "messages": {"messages": []}, "max_tokens": {"max_tokens": 0},
        "temperature": {"temperature": -1}, "top_p": {"top_p": 0}, "logprobs": {"logprobs": True},
        "slo_class": {"slo_class": "a.b"}, "stream_options": {"stream_options": {}},
        "best_of": {"best_of": 3}, "echo": {"echo": True},
        "presence_penalty": {"presence_penalty": 0.5}, "repetition_penalty": {"repetition_penalty": 1.2},
        "tools": {"tools": [{"type": "function"}]}, "logit_bias": {"logit_bias": {"5": 1.0}},
        "response_format": {"response_format": {"type": "json_object"}},
    }
    # Neutral values of unsupported knobs pass (vllm bench serve sends repetition_penalty 1.0).
    assert isinstance(_chat({"messages": [{"role": "user", "content": "x"}], "repetition_penalty": 1.0,
                             "frequency_penalty": 0, "tools": [], "response_format": {"type": "text"}}),
                      om.Mapped)
    for param, extra in cases.items():
        e = _err(_chat({"messages": [{"role": "user", "content": "x"}], **extra}))
        assert (e.status, e.param) == (400, param), (param, e)
    image = [{"type": "image_url", "image_url": {"url": "x"}}]
    assert _err(_chat({"messages": [{"role": "user", "content": image}]})).status == 400
    assert _err(_chat({"messages": [{"role": "user", "content": "x"}]},
                      **{"x-slo-class": "a>b"})).param == "slo_class"


def test_unknown_model_404_only_while_the_fleet_serves_others() -> None:
    live, ever = frozenset({"a"}), frozenset({"a", "b"})
    assert om.model_error("a", live, ever) is None
    assert om.model_error("", live, ever) is None  # any model
    assert om.model_error("b", live, ever) is None  # served before: its workers may be back
    assert om.model_error("c", frozenset(), ever) is None  # empty fleet: the orchestrator waits
    e = om.model_error("c", live, ever)
    assert e is not None and e.status == 404 and e.param == "model"


def test_error_replies_map_to_statuses_and_retry_after() -> None:
    def err(code: ErrorCode, **kw: object) -> om.ApiError:
        return om.error_of(ErrorReply(request_id="r", code=code, message="m", **kw), 2.0)  # type: ignore[arg-type]

    e = err(ErrorCode.OVERLOADED, retryable=True, retry_after_ms=1500)
    assert (e.status, e.headers(), e.type) == (429, {"retry-after": "2"}, "rate_limit_error")
    assert err(ErrorCode.OVERLOADED).headers() == {"retry-after": "2"}  # the default
    assert err(ErrorCode.OVERLOADED, retry_after_ms=10).retry_after_s == 1  # at least 1 s
    assert err(ErrorCode.INVALID_REQUEST).status == 400
    assert err(ErrorCode.TOO_LARGE).status == 400
    assert err(ErrorCode.PROMPT_TOO_LONG).status == 400
    assert err(ErrorCode.UNKNOWN_MODEL).status == 404
    assert err(ErrorCode.OVER_BUDGET).status == 402
    unavailable = err(ErrorCode.MODEL_UNAVAILABLE, retryable=True)
    assert unavailable.status == 503 and unavailable.retry_after_s == 2
    assert err(ErrorCode.WORKER_FAILED).retry_after_s is None  # not retryable: no header
    assert err(ErrorCode.ENGINE_ERROR).status == 500 and err(ErrorCode.INTERNAL).status == 500
    assert err(ErrorCode.INVALID_REQUEST).body()["error"]["code"] == "invalid_request"
    o = om.overloaded("full", 1.0)
    assert o.status == 429 and o.headers() == {"retry-after": "1"}


def _final(**kw: object) -> Final:
    return Final(request_id="r1", finish_reason=FinishReason.LENGTH, text=" a b", model="tiny",
                 usage=Usage(prompt_tokens=3, completion_tokens=2, cached_prompt_tokens=1),
                 **kw)  # type: ignore[arg-type]


def test_non_streaming_replies() -> None:
    m = _ok(_chat({"model": "", "messages": [{"role": "user", "content": "x"}]}))
    c = om.completion(m, _final(), 100)
    assert c["id"] == "chatcmpl-r1" and c["object"] == "chat.completion" and c["model"] == "tiny"
    assert c["choices"] == [{"index": 0, "logprobs": None, "finish_reason": "length",
                             "message": {"role": "assistant", "content": " a b"}}]
    assert c["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
                          "prompt_tokens_details": {"cached_tokens": 1}}
    t = om.completion(_ok(_completion({"prompt": "x"})), _final(), 100)
    assert t["object"] == "text_completion" and t["choices"][0]["text"] == " a b"
    cancelled = Final(request_id="r1", finish_reason=FinishReason.CANCELLED)
    assert om.completion(m, cancelled, 1)["choices"][0]["finish_reason"] == "abort"


def test_stream_mapper_role_first_then_finish_then_usage() -> None:
    m = _ok(_chat({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stream": True,
                   "stream_options": {"include_usage": True}}))
    sm = om.StreamMapper(m, 100)
    one = sm.chunk(TokenChunk(request_id="r1", seq=0, token_ids=[1], text=" a"))
    two = sm.chunk(TokenChunk(request_id="r1", seq=1, token_ids=[2], text=" b"))
    assert one["choices"][0]["delta"] == {"role": "assistant", "content": " a"}
    assert two["choices"][0]["delta"] == {"content": " b"}
    assert one["object"] == "chat.completion.chunk" and one["usage"] is None
    end, usage = sm.final(_final())
    assert end["choices"][0]["finish_reason"] == "length" and end["choices"][0]["delta"] == {}
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 2
    # Without include_usage: no usage key at all, one closing chunk.
    plain = om.StreamMapper(_ok(_completion({"prompt": "x", "stream": True})), 1)
    chunk = plain.chunk(TokenChunk(request_id="r1", seq=0, token_ids=[1], text=" a"))
    assert "usage" not in chunk and chunk["choices"][0]["text"] == " a"
    assert len(plain.final(_final())) == 1
    late = om.StreamMapper.error(om.ApiError(429, "shed", code="overloaded"))
    assert late["error"]["status"] == 429 and late["error"]["message"] == "shed"


def test_sse_framing_round_trips() -> None:
    raw = sse.events([{"a": 1}, {"b": "x\ny"}]) + sse.DONE
    assert raw.startswith(b"data: {") and raw.endswith(b"data: [DONE]\n\n")
    assert raw.count(b"\n\n") == 3
    assert [json.loads(p) for p in sse.parse(raw)[:2]] == [{"a": 1}, {"b": "x\ny"}]
    assert sse.parse(raw)[-1] == "[DONE]"
    assert sse.parse(b": ping\n\ndata: 1\n\n") == ["1"]


def test_api_keys_map_to_tenants() -> None:
    keys = {"k1": "acme", "k2": "globex"}
    assert tenant_for(None, {}) is None and tenant_for("Bearer anything", {}) is None
    assert tenant_for("Bearer k1", keys) == "acme" and tenant_for("bearer  k2 ", keys) == "globex"
    for bad in (None, "", "Bearer", "Bearer nope", "Basic k1", "k1"):
        e = tenant_for(bad, keys)
        assert isinstance(e, om.ApiError) and e.status == 401, bad
    m = om.parse(om.Kind.COMPLETION, b'{"prompt": "x"}', request_id="r", headers={},
                 tenant="acme")
    assert isinstance(m, om.Mapped) and m.request.tenant == "acme"


def test_models_from_fresh_ready_heartbeats() -> None:
    def hb(wid: str, models: list[str], state: WorkerState = WorkerState.READY) -> Heartbeat:
        return Heartbeat(worker_id=wid, role=Role.UNIFIED, models=models, engine="sim",
                         capacity=4, state=state, started_ms=5000.0)

    seen = {"a": Seen(hb("a", ["m1"]), 10.0), "b": Seen(hb("b", ["m1", "m2"]), 9.0),
            "old": Seen(hb("old", ["m3"]), 1.0),
            "drain": Seen(hb("drain", ["m4"], WorkerState.DRAINING), 10.0)}
    live = live_models(seen, now=10.5, timeout_s=3.5)
    assert sorted(live) == ["m1", "m2"] and len(live["m1"]) == 2
    body = model_list(live)
    assert [d["id"] for d in body["data"]] == ["m1", "m2"] and body["object"] == "list"
    assert body["data"][0]["workers"] == 2 and body["data"][0]["created"] == 5
    msgspec.json.encode(body)  # JSON-serialisable as it is


def test_batch_jobs_as_openai_batch_and_file_objects() -> None:
    from cplane.gateway import batch_map as bm
    from cplane.schemas.batch import BatchJob, JobState

    meta = bm.BatchMeta(endpoint="/v1/completions", input_file_id="file-1", metadata={"a": "b"})
    job = BatchJob(id="batch_x", state=JobState.IN_PROGRESS, total=4, invalid=1, completed=2,
                   failed=1, created_ms=2000.0)
    o = bm.batch_object(job, meta, output_ready=False, errors_ready=False)
    assert (o["id"], o["object"], o["status"], o["endpoint"]) == (
        "batch_x", "batch", "in_progress", "/v1/completions")
    assert o["request_counts"] == {"total": 5, "completed": 2, "failed": 2}
    assert o["output_file_id"] is None and o["completed_at"] is None and o["created_at"] == 2
    assert o["metadata"] == {"a": "b"} and o["input_file_id"] == "file-1" and o["errors"] is None
    done = msgspec.structs.replace(job, state=JobState.FAILED, finished_ms=9000.0, error="boom")
    o = bm.batch_object(done, None, output_ready=True, errors_ready=True)
    assert o["failed_at"] == 9 and o["output_file_id"] == "file-batch_x-output"
    assert o["error_file_id"] == "file-batch_x-errors"
    assert o["errors"]["data"][0]["message"] == "boom" and o["endpoint"] == ""
    f = bm.file_object("file-1", 10, bm.FileMeta(filename="a.jsonl", purpose="batch",
                                                   created_at=5))
    assert f == {"id": "file-1", "object": "file", "bytes": 10, "created_at": 5,
                 "filename": "a.jsonl", "purpose": "batch"}


def test_the_gateway_claims_its_minted_ids_fresh_and_nothing_else_does() -> None:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    minted = om.parse(om.Kind.CHAT, body, request_id="r1", headers={}, fresh_id=True)
    plain = om.parse(om.Kind.CHAT, body, request_id="r1", headers={})
    assert isinstance(minted, om.Mapped) and isinstance(plain, om.Mapped)
    assert minted.request.fresh_id and not plain.request.fresh_id
