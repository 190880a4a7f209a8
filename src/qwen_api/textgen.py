"""Text in, text out, on top of an engine: chat template, tokenisation, context checks, fan-out, detokenisation.

This is where "a plain prompt is a user message" and "the answer holds only new text" are enforced, for
every API. It knows nothing of HTTP; the API layers map its exceptions to status codes.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from qwen_api.engine.base import Engine, FinishReason, SamplingParams, TokenChunk

log = logging.getLogger(__name__)


class PromptTooLong(ValueError):
    """Prompt tokens plus requested new tokens exceed what one sequence may hold. Never truncated silently."""

    def __init__(self, prompt_tokens: int, max_new_tokens: int, limit: int) -> None:
        self.prompt_tokens, self.max_new_tokens, self.limit = prompt_tokens, max_new_tokens, limit
        super().__init__(
            f"the prompt has {prompt_tokens} tokens and up to {max_new_tokens} new tokens were requested: "
            f"{prompt_tokens + max_new_tokens} exceeds this model's limit of {limit} tokens"
        )


@dataclass(frozen=True)
class Completion:
    """One finished sequence."""

    text: str
    finish_reason: FinishReason
    completion_tokens: int


class TextGenerator:
    """Turns prompts and chat messages into token ids, and engine tokens back into text."""

    def __init__(self, engine: Engine, tokenizer: Any) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self._special_ids = set(tokenizer.all_special_ids)
        if not getattr(tokenizer, "chat_template", None):
            log.warning("this tokenizer has no chat template: prompts are sent to the model as raw text")

    # ------------------------------------------------------------------------------------------ prompts
    def chat_prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of `messages` in the model's chat template, ending with the assistant's turn opener."""
        if not getattr(self.tokenizer, "chat_template", None):
            return self.text_prompt_ids("\n".join(m["content"] for m in messages))
        encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
        return [int(i) for i in ids]

    def text_prompt_ids(self, text: str) -> list[int]:
        """Token ids of raw text, no template."""
        return [int(i) for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]]

    def check_fits(self, prompt_ids: list[int], max_new_tokens: int) -> None:
        limit = self.engine.max_context_tokens
        if len(prompt_ids) + max_new_tokens > limit:
            raise PromptTooLong(len(prompt_ids), max_new_tokens, limit)

    # ------------------------------------------------------------------------------------------ output
    def decode(self, token_ids: list[int]) -> str:
        """Text of generated tokens, without special tokens (the end-of-turn token among them)."""
        return str(self.tokenizer.decode([t for t in token_ids if t not in self._special_ids]))

    async def complete(self, prompt_ids: list[int], params: SamplingParams, n: int = 1) -> list[Completion]:
        """Generate n independent sequences for one prompt and return them once all have finished."""
        self.check_fits(prompt_ids, params.max_new_tokens)
        return await _gather_all([self._complete_one(prompt_ids, params) for _ in range(n)])

    async def _complete_one(self, prompt_ids: list[int], params: SamplingParams) -> Completion:
        tokens: list[int] = []
        last: TokenChunk | None = None
        async for last in self.engine.generate(prompt_ids, params, incremental=False):
            tokens.extend(last.token_ids)
        assert last is not None and last.finish_reason is not None, "an engine stream ends with a finish reason"
        return Completion(self.decode(tokens), last.finish_reason, len(tokens))


async def _gather_all(coros: list[Any]) -> list[Any]:
    """Like asyncio.gather, but the first failure cancels the siblings instead of leaving them running."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()

