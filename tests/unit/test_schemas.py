"""Wire types: JSON Schema in sync, tagged unions, evolution rules."""

from __future__ import annotations

import json

import msgspec
import pytest

from cplane.schemas.codec import output_decoder, request_decoder, sniff_request_id, work_decoder
from cplane.schemas.export import COMMITTED_DIR, EXPORTED_TYPES, render
from cplane.schemas.messages import (
    ErrorReply,
    Final,
    FinishReason,
    Priority,
    Request,
    TokenChunk,
    WorkBatch,
    WorkItem,
)
from cplane.schemas.subjects import Subjects, valid_token


@pytest.mark.parametrize("name", sorted(EXPORTED_TYPES))
def test_committed_json_schema_matches_structs(name: str) -> None:
    committed = (COMMITTED_DIR / f"{name}.json").read_text(encoding="utf-8")
    assert committed == render(name), f"run `make schema`: {name}.json drifted from the struct"


def test_outputs_decode_by_tag() -> None:
    chunk = TokenChunk(request_id="r", seq=0, token_ids=[1, 2], text="ab")
    final = Final(request_id="r", finish_reason=FinishReason.LENGTH, chunks=1)
    err = ErrorReply(request_id="r", code="invalid_request", message="bad")  # type: ignore[arg-type]
    for msg in (chunk, final, err):
        data = msgspec.json.encode(msg)
        assert json.loads(data)["type"] in {"chunk", "final", "error"}
        assert output_decoder.decode(data) == msg


def test_minimal_raw_request_and_defaults_not_on_wire() -> None:
    req = request_decoder.decode(b'{"request_id": "a", "prompt": "hi"}')
    assert req.max_tokens == 256 and req.priority is None and req.group == "i"
    assert msgspec.json.encode(req) == b'{"request_id":"a","prompt":"hi"}'


def test_unknown_fields_are_ignored_for_evolution() -> None:
    req = request_decoder.decode(b'{"request_id": "a", "prompt": "hi", "from_the_future": 1}')
    assert req.request_id == "a"


def test_wrong_types_and_unknown_priority_are_refused() -> None:
    with pytest.raises(msgspec.ValidationError, match="priority"):
        request_decoder.decode(b'{"request_id": "a", "prompt": "x", "priority": "urgent"}')
    with pytest.raises(msgspec.ValidationError, match="max_tokens"):
        request_decoder.decode(b'{"request_id": "a", "prompt": "x", "max_tokens": "9"}')


def test_work_batch_round_trip() -> None:
    item = WorkItem(request=Request(request_id="a", prompt="x"), priority=Priority.HIGH,
                    slo_class="interactive", resume_token_ids=[5], next_seq=1)
    batch = WorkBatch(items=[item, item])
    assert work_decoder.decode(msgspec.json.encode(batch)) == batch


def test_sniff_request_id() -> None:
    assert sniff_request_id(b'{"request_id": "x1", "max_tokens": "bad"}') == "x1"
    assert sniff_request_id(b"not json") is None
    assert sniff_request_id(b"[1, 2]") is None


def test_subjects() -> None:
    s = Subjects(prefix="llm")
    assert s.request(Priority.HIGH, "interactive") == "llm.req.high.interactive"
    assert s.parse_request("llm.req.high.interactive") == ("high", "interactive")
    assert s.requests_of(Priority.LOW) == "llm.req.low.*"
    assert s.outputs_of("i", "r1") == "llm.*.i.r1"
    assert s.done("job7", "r1") == "llm.done.job7.r1"
    assert Subjects.last_token("llm.done.i.r1") == "r1"
    assert valid_token("abc-1_2") and not valid_token("a.b") and not valid_token("a b")
    assert not valid_token("") and not valid_token("a*") and not valid_token("a>")
