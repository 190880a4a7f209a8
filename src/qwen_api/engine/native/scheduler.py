"""Continuous batching with chunked prefill: which tokens of which sequences the next forward step computes.

A step runs every decoding sequence's next token plus at most `prefill_budget` prompt tokens, taken in order
from sequences still reading their prompt, so a long prompt costs the others at most one chunk of latency per
step. Waiting sequences are admitted while there are batch slots, budget and blocks: an admitted sequence
first takes the cached blocks of its longest indexed prefix (`BlockPool.match_prefix`), then fresh blocks for
the rest of its tokens. A decoding sequence that crosses a block boundary takes one more block; when none is
free, the most recently admitted sequence is preempted (its blocks released, its prompt plus what it generated
put back at the head of the queue, recomputed later, mostly from the prefix cache). A sequence that could
never fit in the whole cache is refused. A request's n samples share one prompt: the first (`Sequence.leader` of
the others) reads it, and the others are admitted once its full prompt blocks are indexed, taking them from the
prefix cache and reading only the prompt's tail (admitted together, each would compute and hold the whole prompt).
Pure bookkeeping: no tensors here.

Prompt batching (`prefill_delay`, off at 0): on CUDA a step that reads more prompt tokens than the CUDA graphs
take (runner.MIXED_EXTRA) runs eagerly (about 20 ms against 5 for a 7B model on an H200); before steps with a
few prompt tokens replayed graphs too, at 64 closed-loop streams half the steps ran eagerly. With a delay factor
d, while sequences decode, new prompts wait until the oldest has waited d times the last prompt step's duration,
and are then read together in one step (as vLLM's `scheduler_delay_factor`). A burst, or a prompt arriving at an
idle engine, is read at once.

Overlapped steps: the engine launches step N+1 before it reads step N's tokens on the host (the GPU runs N+1
while the host delivers N). So `advance` (at launch) moves `computed` on and appends a `PENDING` placeholder for
each sampled token, and `resolve` (once the tokens are read) writes them in by position and indexes the blocks
they filled. A decode whose input is still `PENDING` takes it on the device from the previous step's draw. A
sequence whose pending token is its last by length is not scheduled again; one that drew an end token runs one
step for nothing, whose token is dropped. A preempted sequence waits for its pending token before it is
admitted again.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qwen_api.engine.base import SamplingParams
from qwen_api.engine.native.kv_cache import BlockPool, Parent

_ids = itertools.count()

PENDING = -1  # a sampled token the host has not read yet (see the docstring)


@dataclass(eq=False)
class Sequence:
    tokens: list[int]  # prompt, then every generated token
    prompt_len: int
    params: SamplingParams
    handle: Any = None  # the engine's side: its event loop and output queue
    id: int = field(default_factory=lambda: next(_ids))
    blocks: list[int] = field(default_factory=list)
    computed: int = 0  # leading tokens whose keys and values are in the cache
    hashed: int = 0  # leading blocks registered in the prefix index
    last_prefix: Parent = None  # the pool's prefix id of block `hashed - 1` (before the first: the cache salt)
    cancelled: bool = False
    preemptions: int = 0
    arrived: float = 0.0  # when the scheduler first had it (the scheduler's clock)
    done: bool = False  # finished or cancelled: out of the scheduler for good
    scored: int = 0  # prompt positions whose logits have scored the next prompt token (prompt log-probabilities)
    leader: Sequence | None = None  # another sample of the same request and prompt, which reads the prompt first

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len


@dataclass
class Step:
    decodes: list[Sequence] = field(default_factory=list)  # one token each: tokens[computed]
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)  # tokens[computed : computed + n]

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)

    @property
    def sampled(self) -> list[Sequence]:
        """Sequences that get a new token from this step, in the order of their logits rows."""
        ends = [seq for seq, n in self.prefills if seq.computed + n == len(seq.tokens)]
        return [*self.decodes, *ends]

    @property
    def size(self) -> int:
        return len(self.decodes) + len(self.prefills)

    @property
    def scoring(self) -> list[tuple[Sequence, range]]:
        """The prompt chunks whose positions score the prompt's next tokens (`score_span`), in the stream's order."""
        return [(seq, span) for seq, n in self.prefills if (span := score_span(seq, n))]


# Most prompt tokens a step reads of a sequence that scores its prompt: each is a row of logits over the vocabulary
# (Qwen2's 152k: 0.6 MB in fp32, twice with its log-softmax), which a 2,048-token chunk would make 2.5 GB at once.
SCORE_CHUNK = 256


def _chunk_cap(seq: Sequence) -> int:
    """The most prompt tokens one step may read of `seq`: `SCORE_CHUNK` while it scores its prompt."""
    return SCORE_CHUNK if seq.params.prompt_logprobs is not None and seq.scored < seq.prompt_len - 1 else 1 << 30


def score_span(seq: Sequence, n: int) -> range:
    """The positions of a prompt chunk of `n` tokens from `seq.computed` whose logits give the log-probability of
    the prompt token after them: none unless the sequence asked for the prompt's, and each position once (the last
    prompt token's logits are sampled instead)."""
    if seq.params.prompt_logprobs is None:
        return range(0)
    return range(max(seq.computed, seq.scored), min(seq.computed + n, seq.prompt_len - 1))


class Scheduler:
    def __init__(
        self,
        pool: BlockPool,
        max_batch_size: int,
        prefill_budget: int,
        prefill_delay: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.max_batch_size = max_batch_size
        self.prefill_budget = prefill_budget
        self.prefill_delay = prefill_delay  # see the module docstring; 0: every prompt is read at the next step
        self.prompt_step_s = 0.0  # how long the last step that read prompt tokens took (the engine measures it)
        self.clock = clock
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0  # ever
        self.held_steps = 0  # steps that left waiting prompts for a later one (prompt batching), ever

    def add(self, seq: Sequence) -> None:
        seq.arrived = self.clock()
        self.waiting.append(seq)

    def drop_cancelled(self) -> None:
        self.waiting = deque(s for s in self.waiting if not s.cancelled)
        for seq in [s for s in self.running if s.cancelled]:
            self.finish(seq)

    def finish(self, seq: Sequence) -> None:
        """Leave for good and give the blocks back (indexed ones stay cached until evicted). A preempted sequence
        can finish too (its pending token was its last), from the queue."""
        if seq in self.running:
            self._leave(seq)
        else:
            self.waiting.remove(seq)
        seq.done = True

    def _leave(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pool.release(seq.blocks)
        seq.blocks = []

    # --------------------------------------------------------------------------------------- one step
    def schedule(self) -> tuple[Step, list[Sequence]]:
        """The next step, and the sequences refused because they can never fit in the cache."""
        step = Step()
        for seq in list(self.running):
            decoding = len(seq.tokens) - seq.computed == 1 and not _last_pending(seq)
            if seq in self.running and decoding and self._grow(seq, step):
                step.decodes.append(seq)
        budget = self.prefill_budget
        for seq in self.running:
            remaining = len(seq.tokens) - seq.computed
            if remaining > 1 and budget > 0:
                n = min(remaining, budget, _chunk_cap(seq))
                step.prefills.append((seq, n))
                budget -= n
        refused = self._admit(step, budget)
        return step, refused

    def _grow(self, seq: Sequence, step: Step) -> bool:
        """Make room for one more token of a decoding sequence, preempting the youngest others if need be."""
        bs = self.pool.block_size
        while len(seq.blocks) * bs <= seq.computed:
            if self.pool.num_free:
                seq.blocks.append(self.pool.allocate())
                continue
            victim = next((s for s in reversed(self.running) if s not in step.decodes), seq)
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self._leave(seq)
        seq.computed = seq.hashed = 0
        seq.last_prefix = seq.params.cache_salt
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def holding(self) -> bool:
        """Whether new prompts wait for more to read together: only while others decode (see the docstring)."""
        if not (self.prefill_delay and self.waiting and self.running):
            return False
        return self.clock() - self.waiting[0].arrived < self.prefill_delay * self.prompt_step_s

    def _follows(self, seq: Sequence) -> bool:
        """Whether `seq` waits for its leader, which runs, to index the prompt's full blocks, so as to share them
        (a leader that finished, was cancelled, refused or preempted is waited for no more)."""
        lead = seq.leader
        if lead is None or not self.pool.prefix_cache:  # without the cache there is nothing to share
            return False
        return lead.hashed < lead.prompt_len // self.pool.block_size and lead in self.running

    def _admit(self, step: Step, budget: int) -> list[Sequence]:
        refused: list[Sequence] = []
        if self.holding():
            self.held_steps += 1
            return refused
        bs = self.pool.block_size
        while self.waiting and len(self.running) < self.max_batch_size and budget > 0:
            seq = self.waiting[0]
            if seq.tokens[-1] == PENDING:
                break  # preempted while its token was drawn: read it first
            if self._follows(seq):
                break  # its prompt's blocks come from its leader's steps
            total = -(-len(seq.tokens) // bs)
            if total > self.pool.num_blocks:
                refused.append(self.waiting.popleft())
                continue
            cached = self.pool.match_prefix(seq.tokens, seq.params.cache_salt)
            if seq.params.prompt_logprobs is not None and seq.scored < seq.prompt_len - 1:
                cached = cached[: seq.scored // bs]  # positions not scored yet must be computed to be scored
            if len(cached) * bs >= len(seq.tokens):
                cached = cached[:-1]  # the last token must be computed again: its logits are needed
            idle_cached = sum(1 for b in cached if self.pool.refs[b] == 0)
            if total - len(cached) > self.pool.num_free - idle_cached:
                break  # wait for blocks to be released
            self.waiting.popleft()
            # the prefix-cache counters are of prompts: a preempted sequence finding its own blocks again is no hit
            self.pool.take_cached(cached, len(seq.tokens) // bs, counted=not seq.preemptions)
            seq.blocks = cached + [self.pool.allocate() for _ in range(total - len(cached))]
            seq.computed = len(cached) * bs
            seq.hashed = len(cached)
            seq.last_prefix = self.pool.prefix_id[cached[-1]] if cached else seq.params.cache_salt
            self.running.append(seq)
            n = min(len(seq.tokens) - seq.computed, budget, _chunk_cap(seq))
            step.prefills.append((seq, n))
            budget -= n
        return refused

    def complete(self, step: Step, new_tokens: list[int]) -> None:
        """After the forward pass, when nothing else was launched since: `advance`, then `resolve`."""
        self.resolve(self.advance(step), new_tokens)

    def advance(self, step: Step) -> list[tuple[Sequence, int]]:
        """At launch: advance what is cached and hold a `PENDING` place for each sampled token. Returns each
        sampled sequence (in the order of the step's logits rows) and the position its token will take."""
        sampled = step.sampled
        for seq in step.decodes:
            seq.computed += 1
        for seq, n in step.prefills:
            seq.computed += n
        places = []
        for seq in sampled:
            places.append((seq, len(seq.tokens)))
            seq.tokens.append(PENDING)
        self._index([*step.decodes, *(s for s, _ in step.prefills)])
        return places

    def resolve(self, places: list[tuple[Sequence, int]], new_tokens: list[int]) -> None:
        """Once the step's tokens are read: write them in, and index the blocks they completed."""
        for (seq, index), token in zip(places, new_tokens, strict=True):
            seq.tokens[index] = token
        self._index([seq for seq, _ in places])

    def _index(self, seqs: list[Sequence]) -> None:
        """Register each sequence's blocks that are full of computed, known tokens in the prefix index."""
        bs = self.pool.block_size
        for seq in seqs:
            if seq.done:
                continue
            while (seq.hashed + 1) * bs <= seq.computed:
                start = seq.hashed * bs
                tokens = seq.tokens[start : start + bs]
                if PENDING in tokens:
                    break
                seq.last_prefix = self.pool.register(seq.blocks[seq.hashed], seq.last_prefix, tokens)
                seq.hashed += 1


def _last_pending(seq: Sequence) -> bool:
    """Its pending token is its last by length: it finishes once that token is read, without another step."""
    return seq.tokens[-1] == PENDING and seq.generated >= seq.params.max_new_tokens
