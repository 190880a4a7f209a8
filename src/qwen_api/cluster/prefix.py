"""Which replica holds which prompt prefix: a model, kept by the router, of the engines' prefix caches.

A llama.cpp replica keeps the KV cells of its last `slots` sequences (one per batch slot) and starts a new
prompt in the slot sharing the longest prefix with it, so a conversation's next turn, whose prompt begins with
the previous turn's prompt, is read again only from where it differs. This index remembers, per replica, the
last `slots` prompts routed there, as chains of hashes of whole blocks of `block` tokens (a prompt's k-th hash
stands for its first k blocks), and answers how many leading tokens of a new prompt each replica holds.
Lookups cost one hash per block per replica, whatever the prompts' length. A hash collision (crafted or
not) can only send a prompt to a replica that lacks its prefix: the replicas' own caches compare tokens.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence


def block_hashes(prompt: Sequence[int], block: int) -> list[int]:
    """Hashes of the prompt's first 1, 2, ... whole blocks; each hash covers every token before it too."""
    hashes: list[int] = []
    previous = 0
    for start in range(0, len(prompt) - block + 1, block):
        previous = hash((previous, tuple(prompt[start : start + block])))
        hashes.append(previous)
    return hashes


class PrefixIndex:
    """The last `slots` prompts of each replica, by block hashes; not thread-safe (one router loop uses it)."""

    def __init__(self, slots: int = 8, block: int = 16) -> None:
        self.slots, self.block = slots, block
        # replica -> prompt key (its last block hash) -> that prompt's block hashes, least recent first
        self._prompts: dict[Hashable, OrderedDict[int, frozenset[int]]] = {}

    def add(self, replica: Hashable, prompt: Sequence[int]) -> None:
        hashes = block_hashes(prompt, self.block)
        if not hashes:
            return
        prompts = self._prompts.setdefault(replica, OrderedDict())
        prompts[hashes[-1]] = frozenset(hashes)
        prompts.move_to_end(hashes[-1])
        while len(prompts) > self.slots:
            prompts.popitem(last=False)

    def drop(self, replica: Hashable) -> None:
        self._prompts.pop(replica, None)

    def matched_tokens(self, prompt: Sequence[int], replicas: Sequence[Hashable]) -> dict[Hashable, int]:
        """For each replica, how many leading tokens of `prompt` one of its remembered prompts shares."""
        hashes = block_hashes(prompt, self.block)
        result: dict[Hashable, int] = {}
        for replica in replicas:
            held = self._prompts.get(replica)
            best = 0
            if held:
                for chain in held.values():
                    depth = _depth(hashes, chain)
                    if depth > best:
                        best = depth
                        if best == len(hashes):
                            break
            result[replica] = best * self.block
        return result


def _depth(hashes: list[int], chain: frozenset[int]) -> int:
    """How many of `hashes` (a prefix chain) lie in `chain`: binary search, as chains are prefix-closed."""
    lo, hi = 0, len(hashes)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if hashes[mid - 1] in chain:
            lo = mid
        else:
            hi = mid - 1
    return lo
