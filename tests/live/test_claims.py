"""Request claims (bus/claims.py) against a real nats-server."""

from __future__ import annotations

from nats.aio.client import Client as NATS

from cplane.bus.claims import Claims, claim_key
from cplane.bus.provision import ensure_all
from cplane.bus.stream_config import claims_bucket
from tests.natsfix import isolated_settings
from tests.waiting import until


async def test_a_renewal_whose_last_answer_was_lost_keeps_the_claim(
        nats_url: str, nc: NATS) -> None:
    """A renewal lands but its answer is lost (a cluster node killed mid-write): the
    next renewal is refused over a revision the holder never saw. The entry is still
    the holder's, so the claim is kept (written again), never reported lost, which
    cancelled the run and left another worker waiting on a live streamer."""
    s = isolated_settings(nats_url, worker={"claim_ttl_s": 1.5})
    js = nc.jetstream()
    await ensure_all(js, s)
    lost: list[str] = []

    async def on_lost(rid: str) -> None:
        lost.append(rid)

    claims = Claims(js, s, "w-1", on_lost=on_lost)
    await claims.start()
    try:
        assert await claims.acquire("req-1")
        kv = await js.key_value(claims_bucket(s))
        before = claims._held["req-1"]
        # The write whose answer was lost: our own value, at a revision we never saw.
        await kv.update(claim_key("req-1"), b"w-1", last=before)
        await until(lambda: claims._held.get("req-1", before) > before + 1, 5,
                    "a renewal after the unseen write")
        assert lost == [] and "req-1" in claims._held
        # Another holder's entry is a loss, as before.
        entry = await kv.get(claim_key("req-1"))
        await kv.update(claim_key("req-1"), b"w-2", last=entry.revision)
        await until(lambda: lost == ["req-1"], 5, "the claim reported lost")
        assert "req-1" not in claims._held
    finally:
        await claims.stop()
