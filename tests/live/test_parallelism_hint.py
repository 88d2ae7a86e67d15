"""Request.parallelism_hint on a real nats-server: a request runs only on a worker whose
engine spans that many GPUs (its heartbeats say so), whatever the router; one no
worker can take is refused, naming the sizes served, never run elsewhere. Final.usage
names the prices that applied and where they came from."""

from __future__ import annotations

import nats
import pytest

from cplane.client.sdk import Client, RequestFailed
from cplane.schemas.messages import ErrorCode, Final, Request
from tests.natsfix import isolated_settings
from tests.stack import stack
from tests.waiting import until


async def test_a_hinted_request_runs_on_its_layout_or_is_refused(nats_url: str) -> None:
    # The pool router sends everything to the `any` subject: a hint must still reach
    # only the 2-GPU engine (w1), and unhinted requests keep going anywhere.
    s = isolated_settings(nats_url, sim={"zero_cost": True},
                          orchestrator={"router": "pool", "policy": "fifo", "model_wait_s": 1.0})
    priced = {"parallelism": 2, "price_in_per_1k": 0.5, "price_out_per_1k": 2.0,
              "price_source": "catalogue: test TP2 on h100-80gb"}
    async with stack(s, workers=[{"parallelism": 1}, priced]) as run:
        orch = run.orchestrator
        assert orch is not None
        await until(lambda: len(orch.registry.book) == 2)
        client = Client(await nats.connect(nats_url), s)
        try:
            hinted = [await client.submit(Request(request_id=f"tp2-{i}", prompt="a b c",
                                                  max_tokens=4, parallelism_hint=2))
                      for i in range(8)]
            for h in hinted:
                final = await h.result(timeout=30)
                assert isinstance(final, Final) and final.workers == ["w1"], final
                u = final.usage  # the prices that applied, and where they came from
                assert (u.price_in_per_1k, u.price_out_per_1k) == (0.5, 2.0)
                assert u.price_source == "catalogue: test TP2 on h100-80gb"
                assert abs(u.cost - (u.prompt_tokens * 0.5 + u.completion_tokens * 2.0) / 1000
                           ) < 1e-12
            anywhere = [await client.submit(Request(request_id=f"any-{i}", prompt="a b c",
                                                    max_tokens=4)) for i in range(8)]
            for h in anywhere:
                assert isinstance(await h.result(timeout=30), Final)
            refused = await client.submit(Request(request_id="tp8", prompt="a b c",
                                                  max_tokens=4, parallelism_hint=8))
            with pytest.raises(RequestFailed) as failed:
                await refused.result(timeout=30)
            reply = failed.value.error
            assert reply.code == ErrorCode.MODEL_UNAVAILABLE and reply.retryable
            assert "8 GPUs" in reply.message and "[1, 2]" in reply.message, reply.message
            bad = await client.submit(Request(request_id="neg", prompt="a", max_tokens=1,
                                              parallelism_hint=-1))
            with pytest.raises(RequestFailed) as failed:
                await bad.result(timeout=30)
            assert failed.value.error.code == ErrorCode.INVALID_REQUEST
        finally:
            await client.close()
