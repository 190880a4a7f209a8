"""The llama.cpp engine: GGUF models through llama-cpp-python's bindings, with its own continuous batching.

One llama.cpp context serves up to `max_batch_size` sequences (llama.cpp's `seq_id`s), each with its own
KV stream of `kv_cache_tokens / max_batch_size` cells. A worker thread steps them together: each step puts
every decoding sequence's last token, and the next chunk of any prompt still being read, into one
`llama_batch`, decodes it once, and samples each sequence with its own llama.cpp sampler chain (top-k,
top-p, temperature, and a seeded distribution). New sequences take a free slot between steps, and
cancelled ones leave at the next step. Tokens go back to each sequence's asyncio queue through
`call_soon_threadsafe`, once per step.

Why a stream per sequence and not one unified cache: with a unified cache, a sequence's attention sums run
over cells interleaved with its neighbours' (masked) cells, and the changed summation order flips near-ties:
measured on SmolLM2, two greedy copies of one prompt in one batch gave different texts, and a seed gave
another text beside other requests than alone. With separate streams both hold (tested).

The cost of streams: llama.cpp decodes a batch over several streams in one pass only when its sequence ids are
consecutive in batch order (`split_equal(sequential=true)`); every break in the run is another pass over all the
weights. So the running sequences always hold slots 0..n-1 and go into the batch in slot order. A new sequence
takes a free slot below the number that will run; when one leaves a hole, the highest one moves down into it
(llama.cpp copies its stream at the next decode: a few milliseconds once, against a pass per step). Free slots
keep their cells as a prefix cache (a system prompt, a conversation's history): of the free slots below that
number, a new sequence takes the one whose cells share the longest prefix with its prompt, and when a free slot
above shares a longer one, its cells are copied down, the cells they replace going to the least recently freed
slot. Before this, after one round of requests the slots had scattered and a step took 3 to 5 passes
(bench/llamacpp_slots.py).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import random
import threading
from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterable
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen_api.engine.base import (
    CPU_KV_CACHE_TOKENS,
    DEFAULT_MAX_BATCH_SIZE,
    EngineDead,
    EngineError,
    EngineStats,
    FinishReason,
    SamplingParams,
    TokenChunk,
    TokenLogprob,
    check_prompt_ids,
    checked_chunk,
    common_prefix_len,
    hand_over,
    join_worker,
    relay,
)
from qwen_api.engine.sampler import Row, hold_back
from qwen_api.engine.sampling import (
    LogitControls,
    effective_top_k,
    held_back,
    is_greedy,
    seed32,
    token_logprobs,
)

log = logging.getLogger(__name__)

PREFILL_BUDGET = 512  # prompt tokens read per step, shared by the sequences still prefilling


@dataclass
class _Sequence:
    prompt: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[TokenChunk | BaseException]
    seq_id: int = -1
    read: int = 0  # prompt tokens already in the KV cache
    generated: list[int] = field(default_factory=list)
    sampler: Any = None
    matcher: Any = None  # the grammar's per-sequence state when params.constraint is set
    controls: LogitControls | None = None  # logit bias and penalties, when the params set any
    cancelled: bool = False
    scored: list[TokenLogprob] = field(default_factory=list)  # the prompt's log-probabilities, when asked for


@dataclass(frozen=True)
class _Cells:
    """What a free slot's KV cells hold, and the cache salt of the sequence that wrote them."""

    tokens: list[int]
    salt: str | None = None

    def shared_with(self, seq: _Sequence) -> int:
        """How many of `seq`'s prompt tokens these cells hold already: none across cache salts."""
        return common_prefix_len(self.tokens, seq.prompt) if self.salt == seq.params.cache_salt else 0


class LlamaCppEngine:
    """Serves concurrent sequences from one GGUF model, decoded together by llama.cpp."""

    def __init__(
        self,
        gguf_path: str | Path,
        eos_token_ids: Iterable[int],
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        kv_cache_tokens: int | None = None,
        n_threads: int | None = None,
        prefix_cache: bool = True,
    ) -> None:
        from llama_cpp import _internals, llama_cpp

        self._c, self._internals = llama_cpp, _internals
        llama_cpp.llama_backend_init()
        model_params = safe_model_params()
        self.model = _internals.LlamaModel(path_model=str(gguf_path), params=model_params, verbose=False)
        threads = n_threads or os.cpu_count() or 1
        n_ctx = kv_cache_tokens or CPU_KV_CACHE_TOKENS
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = PREFILL_BUDGET + max_batch_size
        params.n_seq_max = max_batch_size
        params.kv_unified = False  # see the module docstring
        # As llama-cpp-python's own Llama does: the same attention kernels, so the same tokens (tested).
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.n_threads = params.n_threads_batch = threads
        self._ctx = _internals.LlamaContext(model=self.model, params=params, verbose=False)
        self._batch = _internals.LlamaBatch(n_tokens=params.n_batch, embd=0, n_seq_max=1, verbose=False)
        self._vocab = llama_cpp.llama_model_get_vocab(self.model.model)
        self._n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        # llama.cpp's end-of-generation ids besides the given ones (for SmolLM2 also `<reponame>`, which its
        # tokenizer does not count as special): they end a sequence, so they are never its text
        eog = (t for t in range(self._n_vocab) if llama_cpp.llama_vocab_is_eog(self._vocab, t))
        self.end_token_ids = frozenset(eos_token_ids) | frozenset(eog)
        per_sequence = int(llama_cpp.llama_n_ctx_seq(self._ctx.ctx))
        self.max_context_tokens = min(per_sequence, int(self.model.n_ctx_train()))
        self.on_step: Callable[[int], None] | None = None
        self._max_batch = max_batch_size
        self._incoming: queue.Queue[_Sequence] = queue.Queue()
        self._waiting: deque[_Sequence] = deque()
        self._active: dict[int, _Sequence] = {}
        # Free slots keep their KV cells: a new prompt reuses the longest common prefix (the system prompt, a
        # conversation's history) instead of reading it again, if it has the cache salt of the sequence that wrote
        # them (`SamplingParams.cache_salt`).
        self._free: dict[int, _Cells] = {slot: _Cells([]) for slot in range(max_batch_size)}
        self._prefix_cache = prefix_cache
        self.reused_tokens = 0  # prompt tokens taken from cached cells instead of read, ever
        self.admitted_prompt_tokens = 0  # prompt tokens of the sequences given a slot, ever
        self.moved_sequences = 0  # running sequences moved down into a lower slot, ever
        self._running = 0
        self._steps = 0
        self._peak_batch = 0
        self._fatal: BaseException | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="llamacpp-engine", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------------------------------- requests
    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncGenerator[TokenChunk, None]:
        if not self.is_healthy():
            raise EngineDead(f"the llama.cpp worker is not running: {self._fatal}")
        check_prompt_ids(prompt_ids, self._n_vocab)
        if len(prompt_ids) + params.max_new_tokens > self.max_context_tokens:
            raise EngineError("prompt and new tokens exceed the context")
        seq = _Sequence(list(prompt_ids), params, asyncio.get_running_loop(), asyncio.Queue())

        def cancel() -> None:
            seq.cancelled = True  # the worker drops it at its next step and frees its KV cells
            self._wake.set()

        self._running += 1
        self._incoming.put(seq)
        self._wake.set()
        try:
            async with aclosing(relay(seq.out, self._death, cancel)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            self._running -= 1

    def _death(self) -> str | None:
        return None if self.is_healthy() else f"the llama.cpp worker died: {self._fatal}"

    # ----------------------------------------------------------------------------------------- worker
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._schedule()
                if not self._active:
                    self._wake.wait(timeout=0.1)
                    self._wake.clear()
                    continue
                self._step()
        except BaseException as exc:
            log.exception("llama.cpp worker failed")
            self._fatal = exc
            for seq in [*self._active.values(), *self._waiting]:
                seq.loop.call_soon_threadsafe(seq.out.put_nowait, exc)

    def _schedule(self) -> None:
        """Between steps: drop cancelled sequences, admit waiting ones, and keep the running ones in slots 0..n-1."""
        for seq in [s for s in self._active.values() if s.cancelled]:
            self._release(seq)
        while True:
            try:
                self._waiting.append(self._incoming.get_nowait())
            except queue.Empty:
                break
        for seq in [s for s in self._waiting if s.cancelled]:
            self._waiting.remove(seq)
        while self._waiting and self._free:
            running = len(self._active) + min(len(self._waiting), len(self._free))
            self._admit(self._waiting.popleft(), running)
        self._compact()

    def _admit(self, seq: _Sequence, running: int) -> None:
        """Give `seq` a free slot below `running` (how many sequences will run once the waiting ones are in): one
        whose cells share the longest prefix with its prompt. When a free slot above has a longer one, its cells are
        copied down: a stream copy costs less than reading one prompt token (2.8 ms against about 5 ms on the demo
        model, 2-core VM; a 7B model's stream is 2.5x larger, its tokens 50x dearer)."""
        holes = [s for s in self._free if s < running]  # never empty: fewer than `running` sequences are running
        reusable = 0  # with the prefix cache off, every prompt is read whole, as on a fresh server
        if not self._prefix_cache:
            slot = min(holes)
        else:
            shared = {s: cells.shared_with(seq) for s, cells in self._free.items()}
            slot = max(holes, key=lambda s: (shared[s], -s))
            donor = max(self._free, key=lambda s: shared[s])
            if shared[donor] > shared[slot]:
                slot = holes[0]  # the least recently freed hole (_free is in order of release)
                self._keep_elsewhere(slot, spare=donor)
                self._copy_stream(donor, slot)
            reusable = max(shared[slot], shared[donor])
        del self._free[slot]
        # Keep the shared prefix, but read at least the prompt's last token again: its logits are needed. The
        # prompt's log-probabilities need every position's logits: all of it is read.
        keep = min(reusable, len(seq.prompt) - 1) if seq.params.prompt_logprobs is None else 0
        self.reused_tokens += keep
        self.admitted_prompt_tokens += len(seq.prompt)
        self._ctx.kv_cache_seq_rm(slot, keep, -1)
        seq.seq_id, seq.read = slot, keep
        seq.sampler = self._sampler(seq.params)
        if seq.params.constraint is not None:
            seq.matcher = seq.params.constraint.matcher()
        if LogitControls.needed(seq.params):
            seq.controls = LogitControls(seq.params, seq.prompt)
        self._active[slot] = seq

    def _compact(self) -> None:
        """Move the highest running sequence into the lowest free slot until no free slot lies below a running one."""
        while self._free and self._active and (hole := min(self._free)) < (top := max(self._active)):
            seq = self._active.pop(top)
            self._copy_stream(top, hole)
            del self._free[hole]
            self._free[top] = self._in_cache(seq)  # the old stream stays behind as a prefix cache
            seq.seq_id = hole
            self._active[hole] = seq
            self.moved_sequences += 1

    def _keep_elsewhere(self, slot: int, spare: int) -> None:
        """Before a free slot's cells are overwritten, copy them over the least recently freed slot's (neither `slot`
        nor `spare`), so that a cached prompt is not lost while some free slot holds older cells or none."""
        if not self._free[slot].tokens:
            return
        victim = next((s for s in self._free if s not in (slot, spare)), None)  # _free is in order of release
        if victim is None:
            return
        self._copy_stream(slot, victim)
        del self._free[victim]
        self._free[victim] = self._free[slot]

    def _copy_stream(self, source: int, target: int) -> None:
        """Make slot `target`'s cells a copy of slot `source`'s (llama.cpp copies the stream at the next decode)."""
        self._ctx.kv_cache_seq_rm(target, -1, -1)
        self._ctx.kv_cache_seq_cp(source, target, -1, -1)

    def _sampler(self, params: SamplingParams) -> Any:
        sampler = self._internals.LlamaSampler()
        if is_greedy(params.temperature):
            sampler.add_greedy()
            return sampler
        # The shared order (engine/sampling.py): temperature, top-k, top-p, draw. top-k commutes with temperature;
        # top-p does not, so temperature comes before it as in the transformers engine.
        sampler.add_temp(params.temperature)
        if top_k := effective_top_k(params.top_k, self._n_vocab):
            sampler.add_top_k(top_k)
        sampler.add_top_p(params.top_p, 1)
        if params.min_p > 0:
            sampler.add_min_p(params.min_p, 1)
        # seed32 never yields 0xFFFFFFFF, which llama.cpp reads as "pick a random seed": every seed reproduces.
        sampler.add_dist(seed32(params.seed) if params.seed is not None else random.getrandbits(32) % 0xFFFFFFFF)
        return sampler

    @staticmethod
    def _in_cache(seq: _Sequence) -> _Cells:
        """The tokens a sequence's cells hold: the prompt read so far and every generated token but the last."""
        return _Cells(seq.prompt[: seq.read] + seq.generated[:-1], seq.params.cache_salt)

    def _release(self, seq: _Sequence) -> None:
        del self._active[seq.seq_id]
        self._free[seq.seq_id] = self._in_cache(seq)
        seq.sampler.close()

    def _step(self) -> None:
        """One decode over every active sequence, in slot order: a token each, plus a slice of any unread prompt."""
        batch = self._batch.batch
        batch.n_tokens = 0
        sampled: list[tuple[_Sequence, int]] = []  # sequence, index of its logits in the batch
        scoring: list[tuple[_Sequence, int, int]] = []  # the prompt's log-probabilities: sequence, index, next token
        in_batch: set[int] = set()

        def put(seq: _Sequence, token: int, pos: int, want_logits: bool, scores: bool = False) -> None:
            i = batch.n_tokens
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq.seq_id, want_logits or scores
            batch.n_tokens = i + 1
            in_batch.add(seq.seq_id)
            if want_logits:
                sampled.append((seq, i))
            elif scores:
                scoring.append((seq, i, seq.prompt[pos + 1]))

        budget = PREFILL_BUDGET
        for seq in [self._active[slot] for slot in sorted(self._active)]:
            if seq.read < len(seq.prompt):
                take = min(budget, len(seq.prompt) - seq.read)
                scores = seq.params.prompt_logprobs is not None
                for k in range(seq.read, seq.read + take):
                    put(seq, seq.prompt[k], k, want_logits=k == len(seq.prompt) - 1, scores=scores)
                seq.read += take
                budget -= take
            elif seq.generated:
                put(seq, seq.generated[-1], len(seq.prompt) + len(seq.generated) - 1, want_logits=True)
        if batch.n_tokens == 0:
            return
        self._ctx.decode(self._batch)
        if scoring:
            self._score(scoring)
        self._steps += 1
        self._peak_batch = max(self._peak_batch, len(in_batch))
        if self.on_step is not None:
            self.on_step(len(in_batch))
        deliveries: list[tuple[_Sequence, TokenChunk | BaseException]] = []
        for seq, index in sampled:
            token, logprob = self._sample(seq, index)
            seq.generated.append(token)
            reason = self._finish_reason(seq, token)
            prompt = tuple(seq.scored) if seq.params.prompt_logprobs is not None and len(seq.generated) == 1 else None
            chunk = TokenChunk([token], reason, logprob, prompt)
            deliveries.append((seq, checked_chunk(chunk, seq.matcher)))
            if reason is not None:
                self._release(seq)
        hand_over(deliveries, lambda d: d[0].loop, _deliver)

    def _score(self, scoring: list[tuple[_Sequence, int, int]]) -> None:
        """The log-probabilities of prompt tokens, each from the logits of the position before it (the model's raw
        distribution, as every log-probability here), appended to their sequences' `scored`."""
        import numpy as np
        import torch

        rows = np.stack(
            [
                np.ctypeslib.as_array(self._c.llama_get_logits_ith(self._ctx.ctx, i), shape=(self._n_vocab,))
                for _, i, _ in scoring
            ]
        )
        tops = [seq.params.prompt_logprobs or 0 for seq, _, _ in scoring]
        entries = token_logprobs(torch.from_numpy(rows), [token for _, _, token in scoring], tops)
        for (seq, _, _), entry in zip(scoring, entries, strict=True):
            seq.scored.append(entry)

    def _sample(self, seq: _Sequence, index: int) -> tuple[int, tuple[TokenLogprob, ...] | None]:
        """Sample one sequence's next token from row `index` of the batch's logits.

        The grammar's mask, the logit bias and the penalties, then min_tokens' hold, change the row in place before
        the sampler chain reads it (every sampler of the chain starts from `llama_get_logits_ith`); log-probabilities
        come from a copy taken before them."""
        raw = None
        held = bool(held_back(seq.params, len(seq.generated), self.end_token_ids))
        if seq.matcher is not None or seq.controls is not None or seq.params.logprobs is not None or held:
            import numpy as np
            import torch

            row = np.ctypeslib.as_array(self._c.llama_get_logits_ith(self._ctx.ctx, index), shape=(self._n_vocab,))
            if seq.params.logprobs is not None:
                raw = torch.from_numpy(row.copy())
            if seq.matcher is not None:  # structured outputs: -inf for every token the grammar forbids
                row[~seq.matcher.allowed(self._n_vocab)] = -np.inf
            if seq.controls is not None:
                seq.controls.apply(torch.from_numpy(row))  # shares the row's memory
            if held:  # min_tokens: no end yet
                hold_back(torch.from_numpy(row)[None, :], [Row(seq.params, len(seq.generated))], self.end_token_ids)
        token = int(seq.sampler.sample(self._ctx, index))
        if seq.matcher is not None:
            seq.matcher.advance(token)
        if seq.controls is not None:
            seq.controls.accept(token)
        if raw is None:
            return token, None
        return token, tuple(token_logprobs(raw[None, :], [token], [seq.params.logprobs or 0]))

    def _finish_reason(self, seq: _Sequence, token: int) -> FinishReason | None:
        if token in self.end_token_ids and not seq.params.ignore_eos:
            return "stop"
        if len(seq.generated) >= seq.params.max_new_tokens:
            return "length"
        return None

    # ----------------------------------------------------------------------------------------- state
    def is_healthy(self) -> bool:
        return self._thread.is_alive() and self._fatal is None

    def stats(self) -> EngineStats:
        return EngineStats(
            running=self._running,
            waiting=len(self._waiting) + self._incoming.qsize(),
            active=len(self._active),
            steps=self._steps,
            peak_batch_size=self._peak_batch,
            prefix_queried_tokens=self.admitted_prompt_tokens,
            prefix_hit_tokens=self.reused_tokens,
        )

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        join_worker(self._thread, "llama.cpp engine shutdown")


def safe_model_params(defaults: Callable[[], Any] | None = None) -> Any:
    """llama.cpp's default model parameters, less its extra buffer types (AMX, repacked weights) on CPUs that report
    AMX: on the team's Xeon VMs the kernel grants AMX but its instructions die with SIGILL (every decode crashed
    the process, 2026-11-27). Elsewhere the repacked Q4_0/Q4_K kernels stay on (the demo's Q4_1 has none)."""
    from llama_cpp import llama_cpp

    params = (defaults or llama_cpp.llama_model_default_params)()
    if _cpu_reports_amx():
        params.use_extra_bufts = False
    return params


def _cpu_reports_amx() -> bool:
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _deliver(deliveries: list[tuple[_Sequence, TokenChunk | BaseException]]) -> None:
    for seq, chunk in deliveries:
        if not seq.cancelled:
            seq.out.put_nowait(chunk)
