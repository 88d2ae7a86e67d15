"""`classify`: the action for one LLM_REQ delivery, from its facts and the ledger. Pure."""

from __future__ import annotations

from cplane.orchestrator.intake import Intake, Rejection, classify
from cplane.schemas.messages import ErrorCode, Priority, Request, WorkItem

ITEM = WorkItem(request=Request(request_id="r", prompt="x"), priority=Priority.NORMAL,
                slo_class="standard")
BAD = Rejection("r", "i", ErrorCode.INVALID_REQUEST, "no")


def act(*, leading: bool = True, deliveries: int = 1,
        admitted: WorkItem | Rejection | None = ITEM, seq: int = 7,
        held_seq: int | None = None, waiting: bool = False, seen: bool = False) -> Intake:
    return classify(leading=leading, deliveries=deliveries, max_deliveries=8,
                    admitted=admitted, seq=seq, held_seq=held_seq,
                    held_waiting=waiting, seen=seen)


def test_each_delivery_gets_exactly_the_action_its_facts_call_for() -> None:
    assert act(leading=False) is Intake.NAK  # whatever else holds
    assert act(leading=False, deliveries=99, admitted=None) is Intake.NAK
    assert act(deliveries=9, admitted=None) is Intake.DEAD_LETTER
    assert act(admitted=BAD) is Intake.REJECT
    assert act(admitted=BAD, held_seq=7) is Intake.REJECT  # bad bytes never touch the ledger
    assert act(held_seq=7) is Intake.SAME_MESSAGE  # a redelivery of the message we hold
    assert act(held_seq=3, waiting=True) is Intake.DUPLICATE_HELD  # same id, another message
    assert act(held_seq=3, waiting=False) is Intake.DUPLICATE_DONE  # already dispatched
    assert act(seen=True) is Intake.DUPLICATE_DONE  # finished recently
    assert act(deliveries=2) is Intake.RECHECK  # an earlier delivery may have run
    assert act() is Intake.HOLD
