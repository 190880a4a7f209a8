"""Log-probabilities in OpenAI's shapes: the chat entries (`{"token", "logprob", "bytes", "top_logprobs"}`, which the
Responses API's output text carries too) and the legacy completions' parallel lists with their `text_offset`s; and
vLLM's `prompt_logprobs` (per prompt token, `{token id: {"logprob", "rank", "decoded_token"}}`)."""

from __future__ import annotations

import codecs
import dataclasses
from collections.abc import Sequence
from typing import Any

from qwen_api.engine.base import TokenLogprob
from qwen_api.textgen import TextGenerator


class LogprobShape:
    """Log-probabilities in OpenAI's shapes, each token's text and bytes from the generator's tokenizer. `as_ids`
    (vLLM's `return_tokens_as_token_ids`): a token is named "token_id:N" instead of by its text, which a token holding
    part of a character cannot show; its bytes and text offsets stay its own."""

    def __init__(self, generator: TextGenerator, as_ids: bool = False) -> None:
        self._generator = generator
        self._as_ids = as_ids

    def _token(self, token_id: int) -> tuple[str, list[int]]:
        data = self._generator.token_bytes(token_id)
        name = f"token_id:{token_id}" if self._as_ids else data.decode("utf-8", errors="replace")
        return name, list(data)

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text, data = self._token(token_id)
        return {"token": text, "logprob": logprob, "bytes": data}

    def entries(self, entries: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
        """Chat's entries, which the Responses API's output text carries too."""
        return [
            {**self._entry(e.token, e.logprob), "top_logprobs": [self._entry(t, lp) for t, lp in e.top]}
            for e in entries
        ]

    def chat(self, entries: Sequence[TokenLogprob] | None) -> dict[str, Any] | None:
        if entries is None:
            return None
        return {"content": self.entries(entries), "refusal": None}

    def legacy(
        self,
        entries: Sequence[TokenLogprob] | None,
        offsets: TextOffsets | None = None,
        prompt: tuple[list[int], Sequence[TokenLogprob] | None] | None = None,
    ) -> dict[str, Any] | None:
        """`offsets`: where this choice's text stands before these tokens (a stream's goes on across its chunks).
        `prompt`: an echoed prompt's ids and their entries (every token's but the first), listed first, the first
        token's log-probability and alternatives null, as OpenAI's and vLLM's."""
        if entries is None:
            return None
        at = offsets if offsets is not None else TextOffsets()
        out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

        def add(token: int, entry: TokenLogprob | None) -> None:
            out["tokens"].append(self._token(token)[0])
            out["token_logprobs"].append(entry.logprob if entry is not None else None)
            out["top_logprobs"].append({self._token(t)[0]: lp for t, lp in entry.top} if entry is not None else None)
            out["text_offset"].append(at.take(self._generator.token_bytes(token)))

        if prompt is not None and (scored := prompt[1]) is not None:
            for i, token in enumerate(prompt[0]):
                add(token, scored[i - 1] if i else None)
            at.end_text()  # the echoed prompt is text of its own: a character it leaves unfinished is a U+FFFD
        for e in entries:
            add(e.token, e)
        return out

    def vllm_prompt(self, ids: Sequence[int], entries: Sequence[TokenLogprob], width: int) -> list[Any]:
        """vLLM's `prompt_logprobs`: null for the first token (nothing comes before it), then for each token a map
        from token id to `{"logprob", "rank", "decoded_token"}`, the token's own entry first, then its position's
        `width` most likely tokens (ranks 1 to width) where they are other tokens."""
        out: list[Any] = [None]
        for token, entry in zip(ids[1:], entries, strict=True):
            listed = {str(token): self._vllm_entry(token, entry.logprob, entry.rank)}
            for rank, (t, lp) in enumerate(entry.top[:width], 1):
                listed.setdefault(str(t), self._vllm_entry(t, lp, rank))
            out.append(listed)
        return out

    def _vllm_entry(self, token: int, logprob: float, rank: int | None) -> dict[str, Any]:
        # the token's text, whatever `as_ids` says: vLLM names only `logprobs`' entries by id
        text = self._generator.token_bytes(token).decode("utf-8", errors="replace")
        return {"logprob": logprob, "rank": rank, "decoded_token": text}


def narrowed(entries: Sequence[TokenLogprob] | None, width: int) -> tuple[TokenLogprob, ...] | None:
    """`entries` with at most `width` alternatives each (the engine computed the most that any field of the request
    wants: an echoed prompt's `logprobs` may list fewer than its `prompt_logprobs`)."""
    if entries is None:
        return None
    return tuple(e if len(e.top) <= width else dataclasses.replace(e, top=e.top[:width]) for e in entries)


class TextOffsets:
    """`text_offset`s into a choice's text: each token's is the number of characters whole before it. A token
    may hold part of a character (a CJK character is often three byte tokens): it does not move the offset until
    the character is whole, so the offsets never pass the text's end nor go back, streamed or not."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._chars = 0

    def take(self, data: bytes) -> int:
        """This token's offset; then its bytes count."""
        offset = self._chars
        self._chars += len(self._decoder.decode(data))
        return offset

    def end_text(self) -> None:
        """The text so far ends here (an echoed prompt, decoded apart from the answer): bytes of a character it
        leaves unfinished count as the U+FFFD its decoding shows, and the next token starts afresh."""
        self._chars += len(self._decoder.decode(b"", final=True))
        self._decoder.reset()
