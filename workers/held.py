"""Which work messages a worker holds, and which item outcomes each waits for.

Pure bookkeeping, no I/O. A message is keyed by its JetStream stream sequence
(never `id(msg)`, which CPython reuses), so a redelivered copy of a message
held here is recognised: it replaces the Msg used for the eventual ack, and
its running items simply go on. Each item run is a job (any hashable key); a
message is complete (ack it) exactly when every job it waits for has its
outcome stored, whether the job runs for this message or is the running
original of a duplicate it carries.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

from nats.aio.msg import Msg


@dataclass(slots=True)
class _Held:
    msg: Msg  # the newest delivery: the one acked
    waiting: set[Hashable] = field(default_factory=set)  # jobs without a stored outcome


class HeldMessages:
    def __init__(self) -> None:
        self._by_seq: dict[int, _Held] = {}
        self._seqs_of: dict[Hashable, set[int]] = {}  # job -> messages waiting for it

    def __len__(self) -> int:
        return len(self._by_seq)

    def __contains__(self, seq: object) -> bool:
        return seq in self._by_seq

    def msgs(self) -> list[Msg]:
        """Every held message's newest delivery (for in_progress)."""
        return [h.msg for h in self._by_seq.values()]

    def refresh(self, seq: int, msg: Msg) -> bool:
        """A delivery of message `seq`: True (and keep `msg` for the ack) when it is
        already held here, so its items are running or waiting already."""
        held = self._by_seq.get(seq)
        if held is None:
            return False
        held.msg = msg
        return True

    def hold(self, seq: int, msg: Msg, jobs: Iterable[Hashable]) -> bool:
        """Hold message `seq` until each of `jobs` has its outcome.
        False when it waits for nothing (ack it now)."""
        waiting = set(jobs)
        if not waiting:
            return False
        self._by_seq[seq] = _Held(msg=msg, waiting=waiting)
        for job in waiting:
            self._seqs_of.setdefault(job, set()).add(seq)
        return True

    def done(self, job: Hashable) -> list[Msg]:
        """`job` has its outcome stored: the messages now complete (to ack), no
        longer held."""
        complete: list[Msg] = []
        for seq in self._seqs_of.pop(job, set()):
            held = self._by_seq.get(seq)
            if held is None:
                continue
            held.waiting.discard(job)
            if not held.waiting:
                del self._by_seq[seq]
                complete.append(held.msg)
        return complete

    def drop(self, job: Hashable) -> list[Msg]:
        """`job`'s outcome could not be stored: the messages waiting for it, no
        longer held (to nak; a redelivery runs what is still unfinished)."""
        dropped: list[Msg] = []
        for seq in self._seqs_of.pop(job, set()):
            held = self._by_seq.pop(seq, None)
            if held is None:
                continue
            for other in held.waiting - {job}:
                seqs = self._seqs_of.get(other)
                if seqs is not None:
                    seqs.discard(seq)
            dropped.append(held.msg)
        return dropped
