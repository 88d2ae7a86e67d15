"""Detokenizer quirks of vLLM that every engine speaking to it must undo."""

from __future__ import annotations

from typing import Any


def resume_echo(tokenizer: Any, engine_ids: list[int], prompt_len: int) -> str | None:
    """The text vLLM will wrongly put in front of a resumed request's output.

    When prompt + resumed tokens end inside a multi-byte character (the
    streamed tokens stopped mid-character, so that text was never sent),
    vLLM 0.32 primes its `tokenizers.DecodeStream` with those ids, and once the
    character completes the stream returns the text of the *whole* sequence,
    prompt included. We cut that leading part, which is the text of the ids
    before the incomplete tail. None when the tail is complete (no echo).
    """
    raw = getattr(tokenizer, "_tokenizer", None)  # the `tokenizers` object vLLM uses
    if raw is None:
        return None

    def ends_incomplete(end: int) -> bool:
        return raw.decode(engine_ids[max(end - 8, 0) : end], skip_special_tokens=True).endswith(
            "\ufffd"
        )

    end = len(engine_ids)
    while end > prompt_len and ends_incomplete(end):
        end -= 1
    if end == len(engine_ids):
        return None
    return str(raw.decode(engine_ids[:end], skip_special_tokens=True))


__all__ = ["resume_echo"]
