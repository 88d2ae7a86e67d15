"""Prompt blocks as routers and engines name them: the contract behind KV events.

A prompt's full blocks of `block_tokens` token ids get chained 63-bit hashes
(BLAKE2b of the parent hash and the block's ids: equal hash = equal prefix up
to and including that block). Workers translate
their engine's cache events into these hashes (`KvEvents`), and the
orchestrator hashes a request's prompt the same way to look them up, so both
sides must tokenize alike: with the model's own tokenizer (vLLM), or with the
sim engine's word tokenizer below, which lives here for that reason.
"""

from __future__ import annotations

import hashlib
import zlib
from array import array
from collections.abc import Sequence
from typing import Any

from cplane.schemas.messages import ChatMessage

_MASK = (1 << 63) - 1  # JSON-safe for every msgspec/orjson reader


def chain_hashes(token_ids: Sequence[int], block_tokens: int, parent: int = 0
                 ) -> tuple[int, ...]:
    """Chained hashes of the full blocks of `token_ids`, continuing from `parent`."""
    if block_tokens <= 0:
        return ()
    n = len(token_ids) - len(token_ids) % block_tokens
    if n == 0:
        return ()
    data = array("q", token_ids[:n]).tobytes()  # 8 bytes a token: any vocabulary fits
    step = 8 * block_tokens
    out: list[int] = []
    h = parent
    for i in range(0, len(data), step):
        digest = hashlib.blake2b(data[i:i + step], digest_size=8,
                                 key=h.to_bytes(8, "little")).digest()
        h = int.from_bytes(digest, "little") & _MASK
        out.append(h)
    return tuple(out)


def word_token_ids(text: str, vocab_size: int) -> list[int]:
    """The sim engine's tokenizer: deterministic word-level ids (about one a word)."""
    return [zlib.crc32(w.encode()) % vocab_size for w in text.split()] or [1]


def chat_text(messages: Sequence[ChatMessage]) -> str:
    """How the sim engine renders a chat before tokenizing it."""
    return "\n".join(f"{m.role}: {m.content}" for m in messages)




def load_tokenizer(spec: str) -> Any:
    """The Hugging Face tokenizer at `spec` (a directory or a tokenizer.json)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if spec.endswith(".json"):
        return PreTrainedTokenizerFast(tokenizer_file=spec)
    return AutoTokenizer.from_pretrained(spec)


def hf_prompt_ids(tok: Any, prompt: str | None, messages: Sequence[ChatMessage] | None
                  ) -> list[int]:
    """A Hugging Face tokenizer's ids for a text or chat prompt, as the vLLM worker
    feeds its engine (and so as routers must hash it). ValueError: bad input."""
    if prompt is not None:
        return list(tok.encode(prompt))
    msgs = [{"role": m.role, "content": m.content} for m in messages or []]
    if not msgs:
        raise ValueError("messages is empty")
    if getattr(tok, "chat_template", None):
        try:
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # template errors are the caller's input
            raise ValueError(f"chat template failed: {e}") from e
        return list(tok.encode(text, add_special_tokens=False))  # the template writes BOS
    plain = "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:"
    return list(tok.encode(plain))


__all__ = ["chain_hashes", "chat_text", "hf_prompt_ids", "load_tokenizer", "word_token_ids"]
