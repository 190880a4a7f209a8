"""Token ids to text, piece by piece: incremental detokenisation and stop strings that never leak.

`IncrementalDetokenizer` emits text only once it is whole: a byte-level BPE token can hold part of a UTF-8
character (Qwen2 splits most CJK characters and emoji across tokens). For byte-level tokenizers (Qwen2, GPT-2
style, SmolLM2) it maps each token to its bytes once and runs them through an incremental UTF-8 decoder: constant
work per token, an incomplete character is held back, bytes that can never become a character are emitted as
U+FFFD at once, and a character that the sequence's end cuts short is dropped. Other tokenizers (SentencePiece)
decode a small window of recent tokens and hold back a trailing U+FFFD for at most a few tokens.

`StopMatcher` holds back any tail of the text that could still grow into a stop string, so a stop string
split across tokens or chunks is never sent, not even its first characters; given `Stops.shielded`, stop strings
do not count inside a tool call's block.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any

REPLACEMENT = "\ufffd"
# A UTF-8 character has at most 4 bytes, and a token holds at least one: past 4 held-back tokens a trailing U+FFFD
# is no incomplete character but invalid bytes.
_MAX_HELD_TOKENS = 4


@cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character that stands for each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.decoder is None:
        return False
    return bool(json.loads(backend.decoder.__getstate__()).get("type") == "ByteLevel")


class _TokenBytes:
    """Each token id's bytes, computed once per id: added tokens are their text, the rest byte-level symbols."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._added = {int(i): str(t.content) for i, t in (tokenizer.added_tokens_decoder or {}).items()}
        self._memo: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        if (found := self._memo.get(token_id)) is not None:
            return found
        if token_id in self._added:
            data = self._added[token_id].encode()
        else:
            piece = self._tokenizer.convert_ids_to_tokens(token_id) or ""
            decoder = _byte_decoder()
            data = bytes(decoder[c] for c in piece if c in decoder)
        self._memo[token_id] = data
        return data


def byte_level_reader(tokenizer: Any) -> _TokenBytes | None:
    """Each token id's bytes (memoised) for a byte-level tokenizer; None for other kinds (SentencePiece)."""
    return _TokenBytes(tokenizer) if _is_byte_level(tokenizer) else None


class IncrementalDetokenizer:
    """Feeds on token ids, returns new complete text."""

    def __init__(self, tokenizer: Any, skip_ids: Iterable[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._skip = set(skip_ids)
        self._bytes = byte_level_reader(tokenizer)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # The window method (non-byte-level tokenizers)
        self._ids: list[int] = []
        self._prefix = 0  # start of the window decoded for context (merges depend on neighbours)
        self._read = 0  # end of the text already emitted

    def push(self, token_ids: Iterable[int]) -> str:
        ids = [t for t in token_ids if t not in self._skip]
        if self._bytes is not None:
            return str(self._utf8.decode(b"".join(self._bytes(t) for t in ids)))
        self._ids.extend(ids)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        held = len(self._ids) - self._read
        if len(after) <= len(before) or (after.endswith(REPLACEMENT) and held < _MAX_HELD_TOKENS):
            return ""  # nothing new yet, or a character still incomplete: wait for the next token
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before) :]

    def flush(self) -> str:
        """What is left at the end of the sequence; a character the end cut short is dropped, never sent as U+FFFD."""
        if self._bytes is not None:
            self._utf8.reset()  # drops the bytes of an unfinished character
            return ""
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return after[len(before) :].rstrip(REPLACEMENT)

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False))


@dataclass(frozen=True)
class Stops:
    """How an answer's text ends, and what of it is kept.

    Stop strings, and optionally a block, (opening, closing) marker, inside which they do not match: with tools,
    a `<tool_call>` block's arguments may hold a stop string, and a call cut there would be neither a call nor
    content (its markup would leak into the answer's text); the closing marker inside one of the block's JSON strings
    does not close it. `token_ids`: tokens that end the text once generated
    (vLLM's `stop_token_ids`). `include`: the stop string or stop token that ended the text stays at its end (vLLM's
    `include_stop_str_in_output`); as in vLLM, the end token that ends an answer counts as a stop token here.
    `special_text`: special tokens are written as their text (`<|im_start|>`) rather than left out (vLLM's
    `skip_special_tokens` false)."""

    strings: tuple[str, ...] = ()
    shielded: tuple[str, str] | None = None
    include: bool = False
    token_ids: frozenset[int] = frozenset()
    special_text: bool = False


class StopMatcher:
    """Cuts text at the first stop string and holds back tails that may become one (or a shielded block's
    marker, which decides whether a stop string that follows counts)."""

    def __init__(self, stops: Stops | Iterable[str], end_ids: Iterable[int] = ()) -> None:
        """`end_ids`: the tokens that end the sequence in the engine, when their text would otherwise be written
        (`Stops.special_text`): they end the text as stop tokens do, without being one (`matched_token`)."""
        stops = stops if isinstance(stops, Stops) else Stops(tuple(stops))
        self._stops = [s for s in stops.strings if s]
        self._shield = stops.shielded if self._stops else None
        self.include = stops.include
        self._stop_ids, self._end_ids = stops.token_ids, frozenset(end_ids)
        self.token_ids = self._stop_ids | self._end_ids  # the tokens that end the text
        self._inside = False  # within a shielded block
        self._in_string = self._escaped = False  # where that reading stands in the block's JSON
        self._pending = ""
        self._quiet = 0  # chars at the start of `_pending` pushed unarmed: a stop string must end past them
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text, once one has
        self.matched_token: int | None = None  # the stop token (`Stops.token_ids`) that ended it, once one has

    @property
    def active(self) -> bool:
        """Whether there is any stop string to look for."""
        return bool(self._stops)

    def push(self, text: str, armed: bool = True) -> str:
        """Return the text that is safe to emit now. After a stop string, returns "" forever. Text pushed with
        `armed` false (vLLM's min_tokens: the answer's first tokens) cannot complete a stop string; one that begins
        there and ends in armed text still counts, as in vLLM."""
        if self.stopped or not text:
            return ""
        if not self._stops:
            return text
        self._pending += text
        if not armed:
            self._quiet = len(self._pending)
        out: list[str] = []
        shield = self._shield
        while True:
            if shield and self._inside:  # no stop string counts until the block closes
                close = shield[1]
                at = self._block_close(close)
                if at < 0:
                    # what is held back is the start of a marker (no quote or backslash): read again, it changes nothing
                    out.append(self._release(0 if self._in_string else _partial_at_end(self._pending, [close])))
                    return "".join(out)
                out.append(self._release(len(self._pending) - at - len(close)))
                self._inside = False
                continue
            found = [(i, s) for s in self._stops if (i := self._pending.find(s, max(0, self._quiet - len(s) + 1))) >= 0]
            opened = self._pending.find(shield[0]) if shield else -1
            if shield and opened >= 0 and (not found or opened < min(found)[0]):  # a stop string wins a tie
                out.append(self._release(len(self._pending) - opened - len(shield[0])))
                self._inside, self._in_string, self._escaped = True, False, False
                continue
            if found:
                cut, self.matched = min(found)
                self.stopped = True
                out.append(self._pending[: cut + (len(self.matched) if self.include else 0)])
                self._pending = ""
                return "".join(out)
            markers = [*self._stops, shield[0]] if shield else self._stops
            out.append(self._release(_partial_at_end(self._pending, markers)))
            return "".join(out)

    def _block_close(self, close: str) -> int:
        """Where the shielded block's `close` marker starts in `_pending`, or -1: a marker inside one of the
        block's JSON strings (a tool call's argument may hold `</tool_call>`) does not close it."""
        text = self._pending
        for i in range(len(text)):
            c = text[i]
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif c == "\\":
                    self._escaped = True
                elif c == '"':
                    self._in_string = False
            elif c == '"':
                self._in_string = True
            elif text.startswith(close, i):
                return i
        return -1

    def _release(self, keep: int) -> str:
        """Emit all of the pending text but its last `keep` characters."""
        out = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep :]
        self._quiet = max(0, self._quiet - len(out))
        return out

    def stops_at(self, token: int) -> bool:
        """Whether `token`, just generated, ends the text: an end token, or a stop token outside a shielded
        block."""
        return token in self._end_ids or (token in self._stop_ids and not self._inside)

    def end(self, token: int) -> str:
        """`token`, a stop token or an end token (`token_ids`), ended the text: what was held back is text after
        all."""
        out = self.flush()
        if not self.stopped and token in self._stop_ids:
            self.matched_token = token
        self.stopped = True
        return out

    def flush(self) -> str:
        """At the end of the sequence the held-back tail was not a stop string after all."""
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out


def _partial_at_end(text: str, markers: list[str]) -> int:
    """The length of the longest end of `text` that is the start (not the whole) of one of `markers`."""
    longest = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:n]):
                longest = n
                break
    return longest
