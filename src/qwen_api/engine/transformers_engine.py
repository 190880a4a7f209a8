"""The transformers engine: continuous batching with `ContinuousBatchingManager` on a background thread.

The manager owns one generation thread that steps all running sequences together (paged KV cache, new
requests join between steps). Each sequence gets its own asyncio queue, fed by `register_result_handler`
on the event loop: the team measured the shared `request_id_iter` queue at 32 s for a 20-token stream
beside another request, against 0.05 s alone. Sampling is ours, per request (`transformers_processors`): the
manager has no sampling processor of its own and ends each step with an argmax over what ours left.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from qwen_api.engine import transformers_processors
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
    next_output,
)
from qwen_api.engine.sampling import token_logprobs

log = logging.getLogger(__name__)

_PAGE_SIZE = 256
_SCORE_ROWS = 256  # prompt positions turned into log-probabilities at a time
# Architectures whose logits are their last hidden states through a plain `lm_head` (no soft-capping, no scale):
# their prompts are scored from the hidden states, a slice of rows at a time, never the whole [prompt, vocabulary]
_PLAIN_HEADS = frozenset({"qwen2", "qwen3", "llama", "mistral"})


class TransformersEngine:
    """Serves many concurrent sequences from one transformers model through continuous batching."""

    def __init__(
        self,
        model: Any,
        eos_token_ids: Iterable[int],
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        kv_cache_tokens: int | None = None,
        decodable_tokens: int | None = None,
    ) -> None:
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        self.model = model
        self.end_token_ids = frozenset(eos_token_ids)
        self._vocab_size = int(model.config.get_text_config().vocab_size)
        self._decodable = decodable_tokens or self._vocab_size
        if kv_cache_tokens is None and model.device.type == "cpu":
            # The library sizes the cache from 60% of all RAM on a CPU; a bounded default leaves room for others.
            kv_cache_tokens = CPU_KV_CACHE_TOKENS
        num_blocks = None if kv_cache_tokens is None else -(-kv_cache_tokens // _PAGE_SIZE)
        # No sampling processor of transformers' own (transformers_processors.Sampling draws): the step ends in an
        # argmax over the one token ours leaves.
        generation_config = GenerationConfig(
            do_sample=False, max_new_tokens=256, eos_token_id=sorted(self.end_token_ids)
        )
        cb_config = ContinuousBatchingConfig(
            page_size=_PAGE_SIZE,
            num_blocks=num_blocks,
            max_requests_per_batch=max_batch_size,
        )
        self._manager = model.init_continuous_batching(
            generation_config=generation_config, continuous_batching_config=cb_config
        )
        check_internals(self._manager)
        self._grammar = transformers_processors.install_grammar(self._manager)
        self._controls = transformers_processors.install_controls(self._manager, self._decodable)
        if decodable_tokens is not None and decodable_tokens < self._vocab_size:  # the embedding's padding rows
            transformers_processors.install_decodable(self._manager, decodable_tokens)
        self._sampling = transformers_processors.install_sampling(self._manager, self.end_token_ids)
        self._ids = itertools.count()
        self._running = 0
        self._steps = 0
        self._peak_batch = 0
        self.on_step: Callable[[int], None] | None = None
        self._queried_tokens = self._hit_tokens = 0  # prompt tokens looked up in the prefix cache / found there
        self._scorer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prompt-scorer")  # `_score_prompt`
        # The scorer's forward pass and the batch's take turns: run together, the scorer's came out wrong (56 of 60
        # prompts scored beside 4 generating sequences on the CPU; the shared state is inside transformers)
        self._forward = threading.Lock()
        self._looked_up: set[str] = set()  # request ids whose prompt the prefix cache was searched for
        self._hook_each_batch_processor()
        self._manager.start()
        self.max_context_tokens = min(self._wait_for_cache_capacity(), _model_context(model))
        check_internals(self._manager, started=True)

    # ----------------------------------------------------------------------------------------- set-up
    def _hook_each_batch_processor(self) -> None:
        """On each batch processor the manager makes: record how many sequences each forward step carries (the
        proof that requests share the model), run its steps in turn with the prompt scorer (`_forward`), and keep
        salted sequences out of its prefix sharing (`_keep_salted_apart`)."""
        manager = self._manager
        create = manager._create_batch_processor

        def create_counted() -> Any:
            processor = create()
            self._keep_salted_apart(processor.cache)
            compute = processor.model_runner.compute_batch

            def compute_in_turn(*args: Any, **kwargs: Any) -> Any:
                with self._forward:
                    return compute(*args, **kwargs)

            processor.model_runner.compute_batch = compute_in_turn
            schedule = processor.scheduler.schedule_batch

            def schedule_counted(*args: Any, **kwargs: Any) -> Any:
                result = schedule(*args, **kwargs)
                if result[0]:
                    self._steps += 1
                    self._peak_batch = max(self._peak_batch, len(result[0]))
                    if self.on_step is not None:
                        self.on_step(len(result[0]))
                return result

            processor.scheduler.schedule_batch = schedule_counted
            return processor

        manager._create_batch_processor = create_counted

    def _keep_salted_apart(self, cache: Any) -> None:
        """vLLM's cache_salt (`SamplingParams.cache_salt`) on transformers' prefix sharing, whose block hashes take
        no salt: a salted sequence neither reuses cached blocks nor leaves its own to be reused, so no tenant can
        tell from its timing what another's prompts were (sharing within a salt is given up). Counts the lookups."""
        search, mark = cache.search_prefix_match, cache.mark_complete_blocks

        def search_unsalted(request_id: str, prompt_ids: list[int]) -> int:
            if request_id.startswith("salted-"):
                return 0
            found = int(search(request_id, prompt_ids))
            if request_id not in self._looked_up:  # searched again at each pass while it waits for room: count once
                self._looked_up.add(request_id)
                self._queried_tokens += len(prompt_ids)
                self._hit_tokens += found
            return found

        def mark_unsalted(state: Any, complete_blocks: Any) -> None:
            if not state.request_id.startswith("salted-"):
                mark(state, complete_blocks)

        cache.search_prefix_match, cache.mark_complete_blocks = search_unsalted, mark_unsalted

    def _wait_for_cache_capacity(self, timeout: float = 600.0) -> int:
        """The cache is built on the generation thread; wait for it and return how many tokens it holds."""
        deadline = time.monotonic() + timeout
        while self._manager.batch_processor is None:
            if not self._manager.is_running() or time.monotonic() > deadline:
                raise EngineDead(f"the generation thread failed to start: {self._fatal_error()}")
            time.sleep(0.01)
        return int(self._manager.batch_processor.cache.max_tokens_read)

    # ----------------------------------------------------------------------------------------- requests
    def _finish_reason(self, tokens: list[int], ignore_eos: bool = False) -> FinishReason:
        return "stop" if tokens and tokens[-1] in self.end_token_ids and not ignore_eos else "length"

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncGenerator[TokenChunk, None]:
        """Run one sequence; see `Engine.generate`. Leaving the loop early cancels it in the engine."""
        if not self.is_healthy():
            raise EngineDead(f"the generation thread is not running: {self._fatal_error()}")
        check_prompt_ids(prompt_ids, self._vocab_size)
        prompt_logprobs = None
        if params.prompt_logprobs is not None:  # computed before the sequence is queued, off the event loop
            # on the scorer's one thread: one prompt at a time, as each holds a whole prompt's activations; a request
            # cancelled while its scoring waits is dropped from the queue (one that began runs to its end)
            score = functools.partial(self._score_prompt, prompt_ids, params.prompt_logprobs)
            prompt_logprobs = await asyncio.get_running_loop().run_in_executor(self._scorer, score)
        # a salted sequence's id says so, for as long as transformers holds any of its state (`_keep_salted_apart`)
        request_id = f"{'salted' if params.cache_salt is not None else 'seq'}-{next(self._ids)}"
        outputs: asyncio.Queue[Any] = asyncio.Queue()
        self._manager.register_result_handler(request_id, outputs.put_nowait)
        matcher = params.constraint.matcher() if params.constraint is not None else None
        if matcher is not None:
            self._grammar.register(request_id, matcher)
        controlled = self._controls.register(request_id, params, prompt_ids)
        self._sampling.register(request_id, params)
        self._manager.add_request(
            list(prompt_ids),
            request_id=request_id,
            max_new_tokens=params.max_new_tokens,
            streaming=True,  # token by token: time to first token, stop strings and cancellation need it
            eos_token_id=-1 if params.ignore_eos else None,  # -1: no end token (None: the model's)
        )
        self._running += 1
        sent = 0
        finished = False
        try:
            while not finished:
                output = await next_output(outputs, self._death)
                if output.error is not None:
                    finished = True
                    raise EngineError(output.error)
                tokens = output.generated_tokens
                new, sent = tokens[sent:], len(tokens)
                finished = output.is_finished()
                logprobs = controlled.logprobs(new) if controlled is not None and new else None
                prompt, prompt_logprobs = (prompt_logprobs, None) if new else (None, prompt_logprobs)
                if finished:
                    reason = self._finish_reason(tokens, params.ignore_eos)
                    last = checked_chunk(TokenChunk(new, reason, logprobs, prompt), matcher)
                    if isinstance(last, EngineError):
                        raise last
                    yield last
                elif new:
                    yield TokenChunk(new, logprobs=logprobs, prompt_logprobs=prompt)
        finally:
            self._running -= 1
            self._grammar.unregister(request_id)
            self._controls.unregister(request_id)
            self._sampling.unregister(request_id)
            self._looked_up.discard(request_id)
            if not finished:
                self._manager.cancel_request(request_id)
                with self._manager.output_router._lock:
                    self._manager.output_router.result_handlers.pop(request_id, None)

    def _death(self) -> str | None:
        return None if self.is_healthy() else f"the generation thread died: {self._fatal_error()}"

    def _score_prompt(self, prompt_ids: list[int], k: int) -> tuple[TokenLogprob, ...]:
        """The prompt's log-probabilities (`SamplingParams.prompt_logprobs`): the batching manager keeps no prompt
        logits, so a forward pass of the model over the prompt alone, on its own thread between the batch's steps,
        turned into log-probabilities a slice of rows at a time. For the plain-head architectures (`_PLAIN_HEADS`, Qwen2
        among them) the pass stops at the last hidden states and each slice goes through the head in turn: the
        whole prompt's logits were prompt x vocabulary (0.3 MB a token for Qwen2's 152k: 7.6 GB for 24,000 tokens,
        which got the server killed for memory)."""
        import torch

        plain = getattr(self.model.config, "model_type", None) in _PLAIN_HEADS and hasattr(self.model, "model")
        with torch.inference_mode():
            ids = torch.tensor([prompt_ids], device=self.model.device)
            with self._forward:  # in turn with the batch's steps (`__init__`)
                if plain:
                    hidden = self.model.model(input_ids=ids, use_cache=False).last_hidden_state[0]
                    head = self.model.get_output_embeddings()
                else:
                    hidden, head = self.model(input_ids=ids, use_cache=False).logits[0], None
            entries: list[TokenLogprob] = []
            for start in range(0, len(prompt_ids) - 1, _SCORE_ROWS):
                end = min(start + _SCORE_ROWS, len(prompt_ids) - 1)
                rows = (head(hidden[start:end]) if head is not None else hidden[start:end]).float()
                entries += token_logprobs(rows, prompt_ids[start + 1 : end + 1], [k] * (end - start), self._decodable)
        return tuple(entries)

    # ----------------------------------------------------------------------------------------- state
    def _fatal_error(self) -> str:
        return str(self._manager.background_thread_status.fatal_error or "stopped")

    def is_healthy(self) -> bool:
        return self._manager.is_running() and self._manager.background_thread_status.fatal_error is None

    def stats(self) -> EngineStats:
        processor = self._manager.batch_processor
        waiting, active = self._manager.input_queue.qsize(), 0
        if processor is not None:
            waiting += len(processor.scheduler.waiting_requests)
            active = len(processor.scheduler.active_requests)
        return EngineStats(
            running=self._running,
            waiting=waiting,
            active=active,
            steps=self._steps,
            peak_batch_size=self._peak_batch,
            prefix_queried_tokens=self._queried_tokens,
            prefix_hit_tokens=self._hit_tokens,
        )

    def shutdown(self) -> None:
        self._scorer.shutdown(wait=False, cancel_futures=True)
        if self._manager.is_running():
            self._manager.stop(block=True, timeout=10)


# The private parts of transformers' continuous batching this engine relies on (written against 5.24.0).
_INTERNALS = (
    "_create_batch_processor",
    "register_result_handler",
    "cancel_request",
    "input_queue",
    "output_router._lock",
    "output_router.result_handlers",
    "background_thread_status.fatal_error",
    "logit_processor.logits_processor",
    "logit_processor.tensors_required",
    "logit_processor.supported_keys",
    "logit_processor.do_processing",
)
_INTERNALS_STARTED = (
    "batch_processor.scheduler.schedule_batch",
    "batch_processor.scheduler.waiting_requests",
    "batch_processor.scheduler.active_requests",
    "batch_processor.cache.max_tokens_read",
    "batch_processor.cache.search_prefix_match",
    "batch_processor.cache.mark_complete_blocks",
    "batch_processor.model_runner.compute_batch",
)


def check_internals(manager: Any, started: bool = False) -> None:
    """Fail loudly, naming what moved, if a transformers upgrade changed the private parts this engine uses.

    Raised when the engine is built (so the model fails to load with a clear message), never on a first request.
    """
    import transformers

    missing = []
    for path in _INTERNALS_STARTED if started else _INTERNALS:
        obj = manager
        for name in path.split("."):
            if not hasattr(obj, name):
                missing.append(path)
                break
            obj = getattr(obj, name)
    if missing:
        raise EngineError(
            f"transformers {transformers.__version__} no longer has {', '.join(missing)} on its continuous-batching "
            "manager: qwen-api's transformers engine was written against transformers 5.24.0; install that version "
            "(requirements.lock) or update engine/transformers_engine.py"
        )


def _model_context(model: Any) -> int:
    config = model.config.get_text_config()
    return int(getattr(config, "max_position_embeddings", None) or 1 << 30)
