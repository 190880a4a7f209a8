"""vLLM's `bad_words`: token sequences an answer may not produce, applied as a constraint on the next token.

Each word is banned as the tokens it is written with at the start of a text and, where that makes another word
token of the same length, after a space (as vLLM builds them). Before each draw, a banned sequence whose tokens but
the last are the answer's last tokens bans that last token; a one-token word is banned everywhere. Only the answer's
own tokens count (not the prompt's), as in vLLM. Engines apply it through the constraint interface that grammars use
(`engine.base.TokenConstraint`): the same mask on every engine, and on the native engine each step of such a
sequence is read before the next is scheduled (its next mask needs the token).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


def bad_word_tokens(words: Sequence[str], encode: Callable[[str], list[int]]) -> tuple[tuple[int, ...], ...]:
    """The token sequences of `words`: each as written without leading space, and with one where that starts with
    another token and has as many tokens (vLLM's rule). Words that are no tokens at all are left out."""
    out: list[tuple[int, ...]] = []
    for word in words:
        bare = tuple(encode(word.lstrip()))
        if not bare:
            continue
        out.append(bare)
        spaced = tuple(encode(" " + word.lstrip()))
        if spaced and spaced[0] != bare[0] and len(spaced) == len(bare):
            out.append(spaced)
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class BadWords:
    """The banned token sequences of one request; one `BadWordsMatcher` per sequence."""

    sequences: tuple[tuple[int, ...], ...]

    def matcher(self) -> BadWordsMatcher:
        return BadWordsMatcher(self.sequences)

    def bound(self) -> bool:
        return True  # plain token ids: usable in any process


class BadWordsMatcher:
    """One sequence's state: the tokens it has drawn, and which next tokens would complete a banned sequence."""

    def __init__(self, sequences: tuple[tuple[int, ...], ...]) -> None:
        self._always = sorted({s[0] for s in sequences if len(s) == 1})
        self._longer = [s for s in sequences if len(s) > 1]
        self._drawn: list[int] = []

    def banned(self) -> list[int]:
        """The tokens that may not come next."""
        out = list(self._always)
        for seq in self._longer:
            k = len(seq) - 1
            if len(self._drawn) >= k and tuple(self._drawn[-k:]) == seq[:-1]:
                out.append(seq[-1])
        return out

    def allowed(self, width: int) -> np.ndarray:
        row = np.ones(width, dtype=bool)
        row[[t for t in self.banned() if t < width]] = False
        return row

    def advance(self, token: int) -> bool:
        self._drawn.append(int(token))
        return True

    def failure(self) -> str | None:
        return None
