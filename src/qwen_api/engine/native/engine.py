"""`NativeEngine`: the engine contract over our own Qwen2 network, paged KV cache and continuous batcher.

Shaped like the llama.cpp engine: `generate` validates the prompt, queues a sequence (with the others started in
the same tick of its event loop: a request's n samples enter one step together) and waits on its own asyncio
queue; one worker thread admits new sequences, drops cancelled ones, runs one step (every decoding sequence plus
a bounded chunk of prompts), samples each sequence on the device, and sends the tokens back with
`call_soon_threadsafe`, once per step per event loop. Bad input (an empty prompt, an id outside the
vocabulary, too long a prompt) fails only its own sequence; if the worker itself dies, every sequence gets the
error and `is_healthy()` turns False.

Overlapped steps (on CUDA): the worker launches step N+1, its decodes fed on the device from step N's draw,
before it reads step N's tokens, so the host's work between steps (reading and delivering tokens, scheduling,
building the next step's inputs) runs while the GPU computes instead of leaving it idle; the scheduler holds a
place for each token in flight (`scheduler.PENDING`). A step with a grammar-constrained sequence is read
before the next is scheduled (its next mask needs the token).

The KV cache is sized from `kv_cache_tokens`, or on CUDA from the memory left free after the weights (less a
reserve for activations, sampling and CUDA graphs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterable
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

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
    hand_over,
    join_worker,
    relay,
)
from qwen_api.engine.native.config import load_config
from qwen_api.engine.native.controls import BatchControls
from qwen_api.engine.native.kv_cache import KVCache
from qwen_api.engine.native.model import CausalLM
from qwen_api.engine.native.pointwise import Pointwise
from qwen_api.engine.native.runner import Feed, ModelRunner
from qwen_api.engine.native.scheduler import Scheduler, Sequence, Step
from qwen_api.engine.native.weights import load_weights
from qwen_api.engine.sampler import Row, forbid_undecodable, hold_back, sample, to_device
from qwen_api.engine.sampling import LogitControls, logprob_entries, logprob_tensors

log = logging.getLogger(__name__)

CPU_PREFILL_CHUNK = 512  # prompt tokens a step reads, shared by the sequences still reading their prompt
GPU_PREFILL_CHUNK = 2048
GPU_MEMORY_FRACTION = 0.90  # of the free memory after loading, for the KV cache and the reserve below
GPU_RESERVE_BYTES = 3 << 30  # activations of a prefill chunk, logits and sort buffers, CUDA graphs


@dataclass
class _Launched:
    """A step queued on the device: what reading its tokens needs."""

    step: Step
    places: list[tuple[Sequence, int]]  # each sampled sequence and its token's position (Scheduler.advance)
    drawn: torch.Tensor | None  # [len(places)] on the device
    # on the host (once `ready`, on CUDA): the drawn tokens, then for the rows `wanted` their log-probabilities,
    # the best values, the best ids and the ranks (sampling.logprob_tensors)
    host: list[torch.Tensor]
    ready: Any  # a CUDA event recorded after those copies, or None
    wanted: list[int]  # rows that want log-probabilities
    tops: list[int]  # and how many alternatives each
    matchers: list[tuple[int, Any]]
    started: float
    # prompt log-probabilities this step computed (then last in `host`): each position's sequence, the prompt token
    # it scores, and how many alternatives that sequence wants
    scored: list[tuple[Sequence, int, int]] = field(default_factory=list)

    @property
    def constrained(self) -> bool:
        return bool(self.matchers)


@dataclass
class _Handle:
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[TokenChunk | BaseException]
    matcher: Any = None  # the grammar's state for this sequence, when its params carry a constraint
    scored: list[TokenLogprob] = field(default_factory=list)  # the prompt's log-probabilities, when asked for


class NativeEngine:
    """Serves concurrent sequences from one Qwen2/Llama model directory, batched by our own scheduler."""

    def __init__(
        self,
        model_dir: str | Path,
        eos_token_ids: Iterable[int],
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        kv_cache_tokens: int | None = None,
        block_size: int = 16,
        prefill_chunk: int | None = None,
        use_cuda_graphs: bool = True,
        prefix_cache: bool = True,
        fuse_kernels: bool = True,
        prefill_delay: float = 0.0,
        overlap: bool | None = None,
        decodable_tokens: int | None = None,
    ) -> None:
        self.device = torch.device(device)
        # Launch each step before reading the previous one's tokens (see the module docstring); off on the CPU,
        # where launching a step computes it, so reading the previous tokens after it would only delay them.
        self.overlap = self.device.type == "cuda" if overlap is None else overlap
        self.config = load_config(model_dir)
        # ids the tokenizer decodes (len(tokenizer)); the embedding's padding rows past them are never drawn
        self.decodable = min(decodable_tokens or self.config.vocab_size, self.config.vocab_size)
        with torch.inference_mode():
            fused = fuse_kernels and Pointwise.wanted(self.device, dtype)
            self.model = CausalLM(self.config, self.device, dtype, fused=fused).eval()
            load_weights(self.model, model_dir)
        num_blocks = self._num_blocks(kv_cache_tokens, block_size, dtype)
        self.cache = KVCache(self.config, num_blocks, block_size, self.device, dtype)
        self.cache.pool.prefix_cache = prefix_cache
        self.max_context_tokens = min(self.config.max_position_embeddings, num_blocks * block_size)
        self.runner = ModelRunner(
            self.model,
            self.cache,
            max_batch_size,
            max_blocks_per_seq=-(-self.max_context_tokens // block_size),
            use_cuda_graphs=use_cuda_graphs,
        )
        if prefill_chunk is None:  # larger on a GPU: fewer steps to read a burst of prompts (time to first token)
            prefill_chunk = GPU_PREFILL_CHUNK if self.device.type == "cuda" else CPU_PREFILL_CHUNK
        self.scheduler = Scheduler(self.cache.pool, max_batch_size, prefill_chunk, prefill_delay)
        self.controls = BatchControls(max_batch_size, self.config.vocab_size, self.device, self.max_context_tokens)
        self.end_token_ids = frozenset(eos_token_ids)
        self.on_step: Callable[[int], None] | None = None
        self._incoming: deque[Sequence] = deque()  # handed to the worker, a tick of an event loop at a time
        self._incoming_lock = threading.Lock()
        self._arriving: dict[asyncio.AbstractEventLoop, list[Sequence]] = {}  # started in this tick of each loop
        self._running = 0
        self._steps = 0
        self._peak_batch = 0
        self._fatal: BaseException | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="native-engine", daemon=True)
        self._thread.start()

    def _num_blocks(self, kv_cache_tokens: int | None, block_size: int, dtype: torch.dtype) -> int:
        if kv_cache_tokens is not None or self.device.type != "cuda":
            return max(1, (kv_cache_tokens or CPU_KV_CACHE_TOKENS) // block_size)
        free, _ = torch.cuda.mem_get_info(self.device)
        budget = int(free * GPU_MEMORY_FRACTION) - GPU_RESERVE_BYTES
        blocks = budget // KVCache.bytes_per_block(self.config, block_size, dtype)
        if blocks < 1:
            raise EngineError(f"no GPU memory left for the KV cache ({free / 2**30:.1f} GiB free after the weights)")
        size = blocks * KVCache.bytes_per_block(self.config, block_size, dtype)
        log.info("KV cache: %d blocks of %d tokens (%.1f GiB)", blocks, block_size, size / 2**30)
        return int(blocks)

    # ----------------------------------------------------------------------------------------- requests
    def _check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Refuse, for this sequence alone, what the worker could not run (EngineError from its `generate`)."""
        check_prompt_ids(prompt_ids, self.config.vocab_size)
        if params.max_new_tokens < 1:
            raise EngineError("max_new_tokens must be at least 1")
        if len(prompt_ids) + params.max_new_tokens > self.max_context_tokens:
            raise EngineError(
                f"prompt ({len(prompt_ids)} tokens) and new tokens ({params.max_new_tokens}) exceed the context "
                f"({self.max_context_tokens} tokens)"
            )

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncGenerator[TokenChunk, None]:
        if not self.is_healthy():
            raise EngineDead(f"the native engine's worker is not running: {self._fatal}")
        self._check(prompt_ids, params)
        handle = _Handle(asyncio.get_running_loop(), asyncio.Queue())
        seq = Sequence(list(prompt_ids), len(prompt_ids), params, handle)

        def cancel() -> None:
            seq.cancelled = True  # the worker drops it at its next step and releases its blocks
            self._wake.set()

        self._running += 1
        self._submit(seq)
        try:
            async with aclosing(relay(handle.out, self._death, cancel)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            self._running -= 1

    def _submit(self, seq: Sequence) -> None:
        """Hand `seq` to the worker together with every sequence started in the same tick of its event loop (a
        request's n samples): they are scheduled the same way each time they are asked for (in 16-bit the logits
        depend on the batch's shape; README, `seed`), the first reading their prompt and the others its cached
        blocks (`scheduler.Sequence.leader`). The hand-off is the loop's next callback, which runs once every task
        made ready in this tick has reached its first wait."""
        loop = seq.handle.loop
        arriving = self._arriving.setdefault(loop, [])
        arriving.append(seq)
        if len(arriving) == 1:
            loop.call_soon(self._hand_off, loop)

    def _hand_off(self, loop: asyncio.AbstractEventLoop) -> None:
        arrived = self._arriving.pop(loop)
        leaders: dict[tuple[str | None, tuple[int, ...]], Sequence] = {}
        for seq in arrived if len(arrived) > 1 else ():  # a request's samples: one reads the prompt for the others
            key = (seq.params.cache_salt, tuple(seq.tokens))
            if (lead := leaders.setdefault(key, seq)) is not seq and seq.params.prompt_logprobs is None:
                seq.leader = lead
        with self._incoming_lock:
            self._incoming.extend(arrived)
        self._wake.set()

    def _death(self) -> str | None:
        return None if self.is_healthy() else f"the native engine's worker died: {self._fatal}"

    # ----------------------------------------------------------------------------------------- worker
    def _run(self) -> None:
        launched: _Launched | None = None  # the step in flight, whose tokens the host has not read yet
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device.index or 0)  # a new thread starts on device 0
            while not self._stop.is_set():
                with self._incoming_lock:
                    arrived, self._incoming = self._incoming, deque()
                for seq in arrived:
                    self.scheduler.add(seq)
                self.scheduler.drop_cancelled()
                if launched is not None and launched.constrained:
                    self._land(launched)  # a grammar's next mask needs the token on the host
                    launched = None
                step, refused = self.scheduler.schedule()
                for seq in refused:
                    _send([(seq, EngineError("the sequence does not fit in the KV cache"))])
                if not step:
                    if launched is not None:
                        self._land(launched)
                        launched = None
                        continue
                    self._wake.wait(timeout=0.1)
                    self._wake.clear()
                    continue
                following = self._launch(step, launched)  # queued on the device behind the step in flight
                if launched is not None:
                    self._land(launched)  # read and delivered while `following` runs
                launched = following
                if not self.overlap:
                    self._land(launched)
                    launched = None
            if launched is not None:
                self._land(launched)
        except BaseException as exc:
            log.exception("native engine worker failed")
            self._fatal = exc
            for seq in [*self.scheduler.running, *self.scheduler.waiting]:
                with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is waiting there
                    seq.handle.loop.call_soon_threadsafe(seq.handle.out.put_nowait, exc)

    @torch.inference_mode()
    def _launch(self, step: Step, previous: _Launched | None) -> _Launched:
        """Queue the step's forward pass and sampling on the device; nothing here waits for it. Decodes whose
        input is the previous step's draw take it on the device."""
        sampled = step.sampled
        started = time.perf_counter()
        feed = None
        if previous is not None and previous.drawn is not None:
            feed = Feed({seq.id: row for row, (seq, _) in enumerate(previous.places)}, previous.drawn)
        logits = self.runner.run(step, feed)
        logits, scores = logits[: len(sampled)], logits[len(sampled) :]  # the prompt's scoring rows come last
        scoring = step.scoring  # read before the scheduler advances the step's sequences
        scored = [(seq, seq.tokens[p + 1], seq.params.prompt_logprobs or 0) for seq, span in scoring for p in span]
        for seq, span in scoring:
            seq.scored = span.stop
        wanted = [i for i, s in enumerate(sampled) if s.params.logprobs is not None]
        tops = [sampled[i].params.logprobs or 0 for i in wanted]
        wanted_rows = to_device(wanted, logits.device, torch.int64) if wanted else None
        # log-probabilities come from the untouched logits, every row of the model's output (as transformers and vLLM)
        raw = logits.index_select(0, wanted_rows) if wanted_rows is not None else None
        forbid_undecodable(logits, self.decodable)  # before grammars and the draw: padding rows are never drawn
        matchers = [(i, self._matcher(s)) for i, s in enumerate(sampled) if s.params.constraint is not None]
        for i, matcher in matchers:  # structured outputs: what the grammar forbids is -inf before any sampling rule
            allowed = to_device(torch.from_numpy(matcher.allowed(logits.size(-1))), logits.device)
            logits[i].masked_fill_(~allowed, float("-inf"))
        self.controls.retain(self.scheduler.running)
        controlled = [i for i, s in enumerate(sampled) if LogitControls.needed(s.params)]
        if controlled:  # bias and penalties, all rows at once
            applied = self.controls.apply(logits, controlled, [sampled[i] for i in controlled])
        rows = [Row(s.params, s.generated) for s in sampled]
        hold_back(logits, rows, self.end_token_ids)  # min_tokens: no end yet
        drawn = sample(logits, rows) if sampled else None
        if controlled and drawn is not None:
            self.controls.accept(applied, drawn.index_select(0, to_device(controlled, drawn.device, torch.int64)))
        places = self.scheduler.advance(step)
        results = [] if drawn is None else [drawn]
        if raw is not None and wanted_rows is not None and drawn is not None:  # computed now, read with the tokens
            results += logprob_tensors(raw, drawn.index_select(0, wanted_rows), max(tops), self.decodable)
        if scored:  # the prompt's log-probabilities: each position's logits score the prompt token after it
            nxt = to_device([token for _, token, _ in scored], logits.device, torch.int64)
            results += logprob_tensors(scores, nxt, max(k for _, _, k in scored), self.decodable)
        host, ready = _to_host(results)
        return _Launched(step, places, drawn, host, ready, wanted, tops, matchers, started, scored)

    @torch.inference_mode()
    def _land(self, launched: _Launched) -> None:
        """Read a launched step's tokens (waiting for the device) and deliver them."""
        step, places = launched.step, launched.places
        if launched.ready is not None:
            launched.ready.synchronize()  # waits for the device, up to this step's draw only
        host = [t.tolist() for t in launched.host]
        tokens: list[int] = host[0] if launched.drawn is not None else []
        if step.prefills:
            self.scheduler.prompt_step_s = time.perf_counter() - launched.started
        self.scheduler.resolve(places, tokens)
        for i, matcher in launched.matchers:
            matcher.advance(tokens[i])
        logprobs: dict[int, TokenLogprob] = {}
        if launched.wanted:  # after the tokens: their log-probabilities
            wanted = launched.wanted
            chosen, values, ids, ranks = host[1:5]
            entries = logprob_entries([tokens[i] for i in wanted], chosen, values, ids, ranks, launched.tops)
            logprobs = dict(zip(wanted, entries, strict=True))
        if launched.scored:  # last: the prompt's
            chosen, values, ids, ranks = host[-4:]
            scored = launched.scored
            tops = [k for _, _, k in scored]
            entries = logprob_entries([t for _, t, _ in scored], chosen, values, ids, ranks, tops)
            for (seq, _, _), entry in zip(scored, entries, strict=True):
                seq.handle.scored.append(entry)
        self._steps += 1
        self._peak_batch = max(self._peak_batch, step.size)
        if self.on_step is not None:
            self.on_step(step.size)
        deliveries: list[tuple[Sequence, TokenChunk | BaseException]] = []
        for i, ((seq, index), token) in enumerate(zip(places, tokens, strict=True)):
            if seq.done or seq.cancelled:  # finished while this step ran (an end token one step earlier)
                continue
            generated = index + 1 - seq.prompt_len
            reason = self._finish_reason(seq, token, generated)
            logprob = (logprobs[i],) if i in logprobs else None
            prompt = tuple(seq.handle.scored) if seq.params.prompt_logprobs is not None and generated == 1 else None
            chunk = TokenChunk([token], reason, logprob, prompt)
            deliveries.append((seq, checked_chunk(chunk, seq.handle.matcher)))
            if reason is not None:
                self.scheduler.finish(seq)
        _send(deliveries)

    @staticmethod
    def _matcher(seq: Sequence) -> Any:
        if seq.handle.matcher is None:
            assert seq.params.constraint is not None
            seq.handle.matcher = seq.params.constraint.matcher()
        return seq.handle.matcher

    def _finish_reason(self, seq: Sequence, token: int, generated: int) -> FinishReason | None:
        """`generated`: tokens the sequence has with this one (a later step may already hold a place after it)."""
        if token in self.end_token_ids and not seq.params.ignore_eos:
            return "stop"
        if generated >= seq.params.max_new_tokens:
            return "length"
        return None

    # ----------------------------------------------------------------------------------------- state
    def is_healthy(self) -> bool:
        return self._thread.is_alive() and self._fatal is None

    def stats(self) -> EngineStats:
        pool = self.cache.pool
        return EngineStats(
            running=self._running,
            waiting=len(self.scheduler.waiting) + len(self._incoming) + sum(map(len, list(self._arriving.values()))),
            active=len(self.scheduler.running),
            steps=self._steps,
            peak_batch_size=self._peak_batch,
            kv_usage=1 - pool.num_free / pool.num_blocks,  # blocks released but still cached count as free
            prefix_queried_tokens=pool.queried_blocks * pool.block_size,
            prefix_hit_tokens=pool.hit_blocks * pool.block_size,
            preemptions=self.scheduler.preemptions,
        )

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        join_worker(self._thread, "native engine shutdown")


def _to_host(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], Any]:
    """Copies of `tensors` on the host, and on CUDA the event after which they are there. Through pinned memory,
    queued now: a plain `tolist()` when the tokens are read would queue its copy behind the step launched after
    this one, and wait for that step too."""
    if not tensors or tensors[0].device.type != "cuda":
        return tensors, None
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for target, tensor in zip(host, tensors, strict=True):
        target.copy_(tensor, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


def _send(deliveries: list[tuple[Sequence, TokenChunk | BaseException]]) -> None:
    """Hand items to their sequences' queues: one wake-up of each event loop per step."""
    hand_over([(seq, item) for seq, item in deliveries if not seq.cancelled], lambda d: d[0].handle.loop, _deliver)


def _deliver(items: list[tuple[Sequence, TokenChunk | BaseException]]) -> None:
    for seq, item in items:
        if not seq.cancelled:
            seq.handle.out.put_nowait(item)
