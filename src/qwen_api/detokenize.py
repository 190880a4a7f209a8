"""Token ids to text, piece by piece: incremental detokenisation and stop strings that never leak.

`IncrementalDetokenizer` emits text only once it is whole: a byte-level BPE token can hold part of a
UTF-8 character (Qwen2 splits most CJK characters and emoji across tokens), and decoding such a prefix
gives U+FFFD. It decodes a small window of recent tokens rather than the whole sequence each time.

`StopMatcher` holds back any tail of the text that could still grow into a stop string, so a stop string
split across tokens or chunks is never sent, not even its first characters.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Feeds on token ids, returns new complete text."""

    def __init__(self, tokenizer: Any, skip_ids: Iterable[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._skip = set(skip_ids)
        self._ids: list[int] = []
        self._prefix = 0  # start of the window decoded for context (merges depend on neighbours)
        self._read = 0  # end of the text already emitted

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False))

    def push(self, token_ids: Iterable[int]) -> str:
        self._ids.extend(t for t in token_ids if t not in self._skip)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""  # nothing new yet, or a character still incomplete: wait for the next token
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before) :]

    def flush(self) -> str:
        """Whatever is left at the end of the sequence (an incomplete character stays U+FFFD: it is the truth)."""
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return after[len(before) :]


class StopMatcher:
    """Cuts text at the first stop string and holds back tails that may become one."""

    def __init__(self, stops: Iterable[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Return the text that is safe to emit now. After a stop string, returns "" forever."""
        if self.stopped or not text:
            return ""
        if not self._stops:
            return text
        self._pending += text
        cut = min((i for i in (self._pending.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self._pending = self._pending[:cut], ""
            return out
        keep = self._longest_stop_prefix_at_end()
        out = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep :]
        return out

    def flush(self) -> str:
        """At the end of the sequence the held-back tail was not a stop string after all."""
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out

    def _longest_stop_prefix_at_end(self) -> int:
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._pending)), longest, -1):
                if self._pending.endswith(stop[:n]):
                    longest = n
                    break
        return longest
