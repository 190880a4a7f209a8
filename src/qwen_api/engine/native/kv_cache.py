"""The paged KV cache: fixed-size blocks of key/value slots, handed to sequences, shared by common prefixes.

`KVCache` owns the tensors: per layer, keys and values `[num_blocks + 1, block_size, kv_heads, head_dim]`;
the extra last block is scratch, where padded rows of a CUDA-graph batch write their keys harmlessly.
`BlockPool` owns the bookkeeping (pure Python, no tensors): reference counts, and the prefix index. A block
whose slots are all written is indexed under (its parent block's prefix id, its token ids) and gets a prefix id of
its own, never given twice, so one id names a whole prefix; a first block's parent is its sequence's cache salt
(`SamplingParams.cache_salt`, None for none), so salted prefixes are shared only within their salt. A new sequence
walks its prompt block by block and shares every block found (a system prompt, a conversation's history: read
once, then reused). The index compares the tokens themselves, never a bare hash of them: CPython's hash of a
tuple of ints is unkeyed and can be inverted, so a crafted prompt could collide with another's block and be
answered from that prompt's keys and values (the class of vLLM's CVE-2025-25183). Blocks whose count falls to
zero stay indexed on an LRU free list and are only evicted (dropped from the index) when a fresh block is needed;
an evicted prefix's id is never reused, so the blocks indexed below it can no longer be matched.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence

import torch

from qwen_api.engine.native.config import ModelConfig

# A block's key in the prefix index: its parent, the prefix id of the block before it (for a first block its
# sequence's cache salt, or None), and its token ids. Prefix ids are ints, salts strings: they never meet.
Parent = int | str | None
BlockKey = tuple[Parent, tuple[int, ...]]


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, prefix_cache: bool = True) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.prefix_cache = prefix_cache  # off: every sequence computes its whole prompt, as a fresh run does
        self.refs = [0] * num_blocks
        self.index: dict[BlockKey, int] = {}  # -> the block holding it
        self.key_of: list[BlockKey | None] = [None] * num_blocks  # while indexed
        self.prefix_id: list[int | None] = [None] * num_blocks  # while indexed: names the prefix up to the block
        self._ids = itertools.count()
        # Blocks nobody holds, oldest first: fresh ones, then cached ones in the order they were released.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hit_blocks = 0  # blocks reused from the prefix index, ever
        self.queried_blocks = 0  # full prompt blocks looked up, ever
        self.evictions = 0

    @property
    def num_free(self) -> int:
        return len(self.free)

    def match_prefix(self, tokens: Sequence[int], salt: str | None = None) -> list[int]:
        """Indexed blocks holding `tokens`' leading full blocks, under cache salt `salt` (without taking them).
        Stops at the first miss."""
        found: list[int] = []
        if not self.prefix_cache:
            return found
        parent: Parent = salt
        bs = self.block_size
        for start in range(0, len(tokens) - bs + 1, bs):
            block = self.index.get((parent, tuple(tokens[start : start + bs])))
            if block is None:
                break
            found.append(block)
            parent = self.prefix_id[block]
        return found

    def take_cached(self, blocks: list[int], full_blocks: int, counted: bool = True) -> None:
        """Hold the matched blocks (when `counted`, as hits out of `full_blocks` looked up)."""
        if counted:
            self.queried_blocks += full_blocks
            self.hit_blocks += len(blocks)
        for block in blocks:
            if self.refs[block] == 0:
                del self.free[block]
            self.refs[block] += 1

    def allocate(self) -> int:
        """A fresh block; the least recently released one, forgetting its cached content. Caller checks num_free."""
        block, _ = self.free.popitem(last=False)
        if (old := self.key_of[block]) is not None:
            del self.index[old]
            self.key_of[block] = self.prefix_id[block] = None
            self.evictions += 1
        self.refs[block] = 1
        return block

    def register(self, block: int, parent: Parent, tokens: Sequence[int]) -> int:
        """Index a block whose slots are all written, below the prefix `parent`; returns the prefix id it holds
        (the next block's parent). A twin computed concurrently, indexed first, keeps the entry and names it."""
        key = (parent, tuple(tokens))
        holder = self.index.get(key)
        if holder is None and self.key_of[block] is None:
            holder = self.index[key] = block
            self.key_of[block], self.prefix_id[block] = key, next(self._ids)
        if holder is None:  # the block holds another prefix already (not done by the scheduler): below it, a
            return next(self._ids)  # prefix no block holds, so what is indexed there can never be matched
        return self.prefix_id[holder]  # type: ignore[return-value]  # set for every indexed block

    def release(self, blocks: list[int]) -> None:
        # Released in reverse so a sequence's last blocks are evicted before its first ones (its prefix is the
        # part most likely shared); blocks holding nothing indexed are reused first.
        for block in reversed(blocks):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.free[block] = None
                if self.key_of[block] is None:
                    self.free.move_to_end(block, last=False)


class KVCache:
    """Per-layer key and value tensors, plus the pool that hands out their blocks."""

    def __init__(
        self, config: ModelConfig, num_blocks: int, block_size: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        shape = (num_blocks + 1, block_size, config.num_kv_heads, config.head_dim)
        self.layers = [
            (torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
            for _ in range(config.num_layers)
        ]
        self.pool = BlockPool(num_blocks, block_size)
        self.block_size = block_size
        self.scratch_block = num_blocks  # never handed out

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * element
