"""A request's prompt blocks for prefix routers, tokenized as its engine will.

`orchestrator.prefix_tokenizer` says how: "" hashes about 4 characters a token
(the approximate index only ever matches what this orchestrator sent), "words"
is the sim engine's tokenizer, a path loads the model's Hugging Face tokenizer.
With the engine's own tokens, the hashes equal those workers report in their
KV events (schemas/blocks.py), which is what precise prefix routing needs.
"""

from __future__ import annotations

from cplane.orchestrator.prefix_router import prompt_blocks
from cplane.schemas.blocks import (
    chain_hashes,
    chat_text,
    hf_prompt_ids,
    load_tokenizer,
    word_token_ids,
)
from cplane.schemas.messages import Request

MAX_TOKENIZED_CHARS = 32_768  # tokenizing runs on the dispatch loop: bound its cost


class PromptHasher:
    def __init__(self, spec: str, block_tokens: int, vocab_size: int = 32_000) -> None:
        self.spec = spec
        self.block_tokens = block_tokens
        self.vocab_size = vocab_size
        self._tok = load_tokenizer(spec) if spec not in ("", "words") else None

    def token_ids(self, req: Request) -> list[int] | None:
        """The engine's token ids for the prompt; None = unknown (approximate)."""
        if req.prompt_token_ids is not None:
            return req.prompt_token_ids
        if self.spec == "words":
            text = req.prompt if req.prompt is not None else chat_text(req.messages or [])
            return word_token_ids(text, self.vocab_size)
        if self._tok is not None:
            try:
                return hf_prompt_ids(self._tok, req.prompt, req.messages)
            except ValueError:
                return None  # the worker answers the bad input; routing needs no blocks
        return None

    def blocks(self, req: Request) -> tuple[int, ...]:
        prompt = req.prompt
        if self._tok is not None and prompt is not None and len(prompt) > MAX_TOKENIZED_CHARS:
            # The head alone: its blocks are the prompt's, but for the last one,
            # which the cut may have tokenized differently.
            head = hf_prompt_ids(self._tok, prompt[:MAX_TOKENIZED_CHARS], None)
            return chain_hashes(head, self.block_tokens)[:-1]
        ids = self.token_ids(req)
        if ids is not None:
            return chain_hashes(ids, self.block_tokens)
        text = req.prompt if req.prompt is not None else (
            chat_text(req.messages) if req.messages else None)
        return prompt_blocks(None, text, self.block_tokens)


__all__ = ["PromptHasher"]
