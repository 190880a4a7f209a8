"""Text in, text out, on top of an engine: chat template, tokenisation, context checks, fan-out, detokenisation.

This is where "a plain prompt is a user message" and "the answer holds only new text" are enforced, for
every API. It knows nothing of HTTP; the API layers map its exceptions to status codes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from qwen_api.detokenize import IncrementalDetokenizer, StopMatcher, Stops, byte_level_reader
from qwen_api.engine.base import Engine, EngineError, FinishReason, SamplingParams, TokenLogprob
from qwen_api.engine.sampling import choice_seed
from qwen_api.structured.grammar import GrammarCompiler

log = logging.getLogger(__name__)
T = TypeVar("T")


class PromptTooLong(ValueError):
    """Prompt tokens plus requested new tokens exceed what one sequence may hold. Never truncated silently."""

    def __init__(
        self, prompt_tokens: int, max_new_tokens: int, limit: int, at_least: bool = False, none_kept: bool = False
    ) -> None:
        """`at_least`: `prompt_tokens` is a bound from the prompt's length, not its count (it was never tokenised).
        `none_kept`: the request asked for no new token (max_tokens 0), and `max_new_tokens` is the one the engine
        draws all the same while it reads the prompt."""
        self.prompt_tokens, self.max_new_tokens, self.limit = prompt_tokens, max_new_tokens, limit
        has = f"at least {prompt_tokens}" if at_least else f"{prompt_tokens}"
        asked = (
            "no new token was requested, but reading a prompt draws one (left out of the answer)"
            if none_kept
            else f"up to {max_new_tokens} new tokens were requested"
        )
        super().__init__(
            f"the prompt has {has} tokens and {asked}: {prompt_tokens + max_new_tokens} exceeds this model's limit "
            f"of {limit} tokens"
        )


# More characters than any token here holds (Qwen2's longest is 128): a text longer than this many times the context
# is longer than the context, whatever its tokens.
MAX_CHARS_PER_TOKEN = 256


class TemplateMismatch(ValueError):
    """The chat template did not render a message as given (it dropped or altered one): its ids cannot be told."""


class EmptyPrompt(ValueError):
    """The prompt is no tokens at all: there is nothing to continue (and an engine must never see it)."""

    def __init__(self) -> None:
        super().__init__("the prompt is empty: it must hold at least one token")


@dataclass(frozen=True)
class TextDelta:
    """New text of sequence `index`; its last delta carries the finish reason and its token count."""

    index: int
    text: str
    finish_reason: FinishReason | None = None
    completion_tokens: int = 0
    stop_string: str | None = None  # the stop string that ended it, if one did
    stop_token: int | None = None  # the stop token (`Stops.token_ids`) that ended it, if one did
    # With logprobs asked for: one entry per token received since the previous delta (text held back while it may
    # become a stop string or a whole character waits with its tokens' entries).
    logprobs: tuple[TokenLogprob, ...] | None = None
    # With the prompt's log-probabilities asked for (`SamplingParams.prompt_logprobs`): on the sequence's first delta
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None
    # The tokens received since the previous delta that count (as `logprobs`; a stop token included: vLLM's token_ids)
    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Completion:
    """One finished sequence."""

    text: str
    finish_reason: FinishReason
    completion_tokens: int
    stop_string: str | None = None
    stop_token: int | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None  # one entry per generated token, when asked for
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # one per prompt token but the first, when asked for
    token_ids: tuple[int, ...] = ()  # the answer's tokens (`completion_tokens` of them)


class SequenceObserver(Protocol):
    """Told about every sequence (metrics): how one that ends normally went, and what one left early (its client
    gone, its time up, a failure) generated all the same."""

    def sequence_finished(self, completion_tokens: int, ttft: float, e2e: float) -> None: ...

    def sequence_left(self, completion_tokens: int) -> None: ...


class TextGenerator:
    """Turns prompts and chat messages into token ids, and engine tokens back into text."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: Any,
        observer: SequenceObserver | None = None,
        sampling_defaults: dict[str, float] | None = None,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.observer = observer
        # The checkpoint's generation_config defaults: what /v1 requests get for sampling fields they leave out.
        self.sampling_defaults = dict(sampling_defaults or {})
        self.grammars = GrammarCompiler(tokenizer)  # structured outputs; builds nothing until first used
        # never text (but with vLLM's skip_special_tokens false): special tokens, those the tokenizer names and the
        # added ones marked special (Qwen2's <|im_start|>, which transformers leaves out of all_special_ids but its
        # decode skips, as vLLM does), and the tokens the engine ends a sequence on (which need not be special)
        added = {int(i): t for i, t in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items()}
        marked = {i: str(t.content) for i, t in added.items() if getattr(t, "special", False)}
        self._special_ids = set(tokenizer.all_special_ids) | set(marked) | engine.end_token_ids
        self._token_bytes = byte_level_reader(tokenizer)
        self._special_texts = {str(t) for t in tokenizer.all_special_tokens} | set(marked.values())
        if not getattr(tokenizer, "chat_template", None):
            log.warning("this tokenizer has no chat template: prompts are sent to the model as raw text")
        self._tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")

    async def off_loop(self, work: Callable[[], T]) -> T:
        """`work()`, a prompt's templating and tokenisation, on the tokenizer's own thread rather than the event
        loop's: a prompt of a megabyte or two (the body limit) takes about a second to tokenise, and every stream
        would stall meanwhile; the tokenizer lets go of the GIL while it works. One thread, so that calls into
        the tokenizer never overlap."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizing, work)

    # ------------------------------------------------------------------------------------------ prompts
    def chat_prompt_ids(
        self,
        messages: list[dict[str, str]],
        tools: list[dict[str, Any]] | None = None,
        generation_prompt: bool = True,
        template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """Token ids of `messages` in the model's chat template, ending with the assistant's turn opener (unless not
        `generation_prompt`); `template_kwargs` are more variables for the template.

        Message content is text, always: a `<|im_end|>` typed inside a message is tokenised as the characters it
        is, never as the control token, so only the template itself can open or close a turn.
        """
        if not getattr(self.tokenizer, "chat_template", None):
            return self.content_ids("\n".join(m["content"] for m in messages))
        extra = template_kwargs or {}
        if extra and not any(self._holds_special(m["content"]) for m in messages):
            # A request's variables may make the template write any amount of text (`'x' * n`): its length is checked
            # before the tokenizer reads it, which takes memory and time in proportion.
            rendered = self._render(messages, tools, generation_prompt, extra)
            self._check_rendered(rendered)
            return self.text_prompt_ids(rendered)
        if not any(self._holds_special(m["content"]) for m in messages):  # the common case: the template's own ids
            return self._template_ids(messages, tools, generation_prompt, extra)
        # Render with a placeholder per message, then tokenise the template's text with its control tokens and
        # each content as plain text.
        marks = [f"\x00{uuid.uuid4().hex}\x00" for _ in messages]
        marked = [{**m, "content": mark} for m, mark in zip(messages, marks, strict=True)]
        rendered = self._render(marked, tools, generation_prompt, extra)
        self._check_rendered(rendered)
        ids: list[int] = []
        for mark, message in zip(marks, messages, strict=True):
            before, found, rendered = rendered.partition(mark)
            if not found:  # the template dropped or altered a message: never guess, refuse
                raise TemplateMismatch("the chat template did not render every message")
            ids += self.text_prompt_ids(before) + self.content_ids(message["content"])
        return ids + self.text_prompt_ids(rendered)

    def _check_rendered(self, rendered: str) -> None:
        """A rendered prompt of more characters than `MAX_CHARS_PER_TOKEN` per token of the context can never fit
        it: `PromptTooLong` before it is tokenised."""
        context = self.engine.max_context_tokens
        if len(rendered) > MAX_CHARS_PER_TOKEN * context:
            raise PromptTooLong(len(rendered) // MAX_CHARS_PER_TOKEN, 0, context, at_least=True)

    def _render(
        self,
        messages: list[dict[str, str]],
        tools: list[dict[str, Any]] | None,
        generation_prompt: bool,
        extra: dict[str, Any],
    ) -> str:
        return str(
            self.tokenizer.apply_chat_template(
                messages, tools=tools, add_generation_prompt=generation_prompt, tokenize=False, **extra
            )
        )

    def _template_ids(
        self,
        messages: list[dict[str, str]],
        tools: list[dict[str, Any]] | None,
        generation_prompt: bool,
        extra: dict[str, Any],
    ) -> list[int]:
        encoded = self.tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=generation_prompt, tokenize=True, **extra
        )
        ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
        return [int(i) for i in ids]

    def _holds_special(self, text: str) -> bool:
        return any(token in text for token in self._special_texts)

    def content_ids(self, text: str) -> list[int]:
        """Token ids of user-supplied text in which control tokens' texts are plain characters."""
        encoded = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)
        return [int(i) for i in encoded["input_ids"]]

    def text_prompt_ids(self, text: str, special: bool = False) -> list[int]:
        """Token ids of raw text, no template (control tokens written in it are parsed: raw prompts may use them);
        with `special`, the tokenizer's own special tokens added (a BOS, for tokenizers that have one)."""
        return [int(i) for i in self.tokenizer(text, add_special_tokens=special)["input_ids"]]

    def decode_all(self, token_ids: list[int]) -> str:
        """The text of token ids as given, special tokens included (what a prompt of ids says; /detokenize)."""
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False))

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (part of a character, for byte-level tokens that split one)."""
        if self._token_bytes is not None:
            return self._token_bytes(token_id)
        return str(self.tokenizer.decode([token_id], skip_special_tokens=False)).encode()

    @property
    def vocab_size(self) -> int:
        """Token ids a request may name (logit_bias): the tokenizer's, base vocabulary and added tokens."""
        return len(self.tokenizer)

    def check_fits(self, prompt_ids: list[int], max_new_tokens: int) -> None:
        """The one check that a request can run: some prompt, and prompt plus new tokens within the context."""
        if not prompt_ids:
            raise EmptyPrompt()
        limit = self.engine.max_context_tokens
        if len(prompt_ids) + max_new_tokens > limit:
            raise PromptTooLong(len(prompt_ids), max_new_tokens, limit)

    # ------------------------------------------------------------------------------------------ output
    async def complete(
        self, prompt_ids: list[int], params: SamplingParams, n: int = 1, stop: Sequence[str] | Stops = ()
    ) -> list[Completion]:
        """Generate n independent sequences for one prompt and return them once all have finished."""
        return await self.complete_each([prompt_ids], params, n, stop)

    async def complete_each(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        n: int = 1,
        stop: Sequence[str] | Stops = (),
        observed: bool = True,
    ) -> list[Completion]:
        """`complete` for several prompts at once: prompt k's sample j is completion k * n + j. Not `observed`: the
        observer (metrics) is not told of these sequences (an answer that keeps none of its tokens)."""
        jobs = self._jobs(prompts, params, n)
        return await _gather_all([self._collect(self._sequence(*job, stop, observed)) for job in jobs])

    def stream(
        self, prompt_ids: list[int], params: SamplingParams, n: int = 1, stop: Sequence[str] | Stops = ()
    ) -> AsyncGenerator[TextDelta, None]:
        """Generate n sequences, yielding their deltas interleaved as they come. Closing it cancels them all.

        The context check runs now, not at the first iteration, so a caller can still answer with an error status.
        """
        return self.stream_each([prompt_ids], params, n, stop)

    def stream_each(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        n: int = 1,
        stop: Sequence[str] | Stops = (),
        observed: bool = True,
    ) -> AsyncGenerator[TextDelta, None]:
        """`stream` for several prompts at once: prompt k's sample j is sequence k * n + j; `observed` as in
        `complete_each`."""
        return self._interleave(self._jobs(prompts, params, n), stop, observed)

    def _jobs(
        self, prompts: list[list[int]], params: SamplingParams, n: int
    ) -> list[tuple[int, list[int], SamplingParams]]:
        """Each sequence of n samples of each prompt, once every prompt passed the context check: its index (prompt
        k's sample j is k * n + j), its prompt, its params."""
        for prompt_ids in prompts:
            self.check_fits(prompt_ids, params.max_new_tokens)
        return [(k * n + j, ids, _for_choice(params, j)) for k, ids in enumerate(prompts) for j in range(n)]

    async def _interleave(
        self, jobs: list[tuple[int, list[int], SamplingParams]], stop: Sequence[str] | Stops, observed: bool = True
    ) -> AsyncGenerator[TextDelta, None]:
        if len(jobs) == 1:  # one sequence: its deltas as they are, without a task and a queue between (a hop per event)
            async with aclosing(self._sequence(*jobs[0], stop, observed)) as deltas:
                async for delta in deltas:
                    yield delta
            return
        queue: asyncio.Queue[TextDelta | BaseException] = asyncio.Queue()

        async def pump(index: int, prompt_ids: list[int], params: SamplingParams) -> None:
            try:
                async for delta in self._sequence(index, prompt_ids, params, stop, observed):
                    queue.put_nowait(delta)
            except Exception as exc:
                queue.put_nowait(exc)

        tasks = [asyncio.create_task(pump(*job)) for job in jobs]
        try:
            unfinished = len(jobs)
            while unfinished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                unfinished -= item.finish_reason is not None
                yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _sequence(
        self,
        index: int,
        prompt_ids: list[int],
        params: SamplingParams,
        stop: Sequence[str] | Stops,
        observed: bool = True,
    ) -> AsyncGenerator[TextDelta, None]:
        """One sequence as text deltas; a stop string ends it (and cancels it in the engine) at once."""
        stops = stop if isinstance(stop, Stops) else Stops(tuple(stop))
        # with special tokens as text, the end token that ends the answer is none of it all the same (vLLM)
        skip = () if stops.special_text else self._special_ids
        ends = self.engine.end_token_ids if stops.special_text and not params.ignore_eos else ()
        detokenizer, matcher = IncrementalDetokenizer(self.tokenizer, skip_ids=skip), StopMatcher(stops, end_ids=ends)
        produced = 0
        start, first = time.perf_counter(), 0.0
        report = self.observer if observed else None  # until told how the sequence ended
        pending: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        ids: list[int] = []  # tokens not yet handed to a delta
        prompt: tuple[TokenLogprob, ...] | None = None  # the prompt's log-probabilities, for the next delta
        tokens = self.engine.generate(prompt_ids, params)
        try:
            async for chunk in tokens:
                if not produced and chunk.token_ids:
                    first = time.perf_counter() - start
                    prompt = chunk.prompt_logprobs
                    if params.prompt_logprobs is not None and (prompt is None or len(prompt) != len(prompt_ids) - 1):
                        raise EngineError("the engine returned no log-probabilities of the prompt, asked for")
                if pending is not None and (chunk.logprobs is None or len(chunk.logprobs) != len(chunk.token_ids)):
                    raise EngineError("the engine returned tokens without the log-probabilities asked for")
                text, used = _push(chunk.token_ids, detokenizer, matcher, quiet=params.min_tokens - produced)
                produced += used
                ids.extend(chunk.token_ids[:used])
                if pending is not None and chunk.logprobs is not None:
                    pending.extend(chunk.logprobs[:used])
                if chunk.finish_reason is not None:
                    text += matcher.push(detokenizer.flush())
                    text += matcher.flush()
                finish = "stop" if matcher.stopped else chunk.finish_reason
                if finish is not None:
                    if report is not None:
                        report.sequence_finished(produced, first, time.perf_counter() - start)
                        report = None
                    yield TextDelta(
                        index,
                        text,
                        finish,
                        produced,
                        matcher.matched,
                        matcher.matched_token,
                        _take(pending),
                        prompt,
                        _take(ids) or (),
                    )
                    return
                if text:
                    taken = _take(ids) or ()
                    yield TextDelta(index, text, logprobs=_take(pending), prompt_logprobs=prompt, token_ids=taken)
                    prompt = None
        finally:
            await tokens.aclose()
            if report is not None and produced:  # left before its end: its tokens count too
                report.sequence_left(produced)

    @staticmethod
    async def _collect(deltas: AsyncGenerator[TextDelta, None]) -> Completion:
        # aclosing: leaving at the finish delta (a stop string matched) closes the sequence now, which cancels it in
        # the engine; without it the engine decoded on until garbage collection closed the generator.
        parts: list[str] = []
        logprobs: list[TokenLogprob] = []
        ids: list[int] = []
        prompt: tuple[TokenLogprob, ...] | None = None
        async with aclosing(deltas):
            async for delta in deltas:
                parts.append(delta.text)
                logprobs.extend(delta.logprobs or ())
                ids.extend(delta.token_ids)
                prompt = prompt if prompt is not None else delta.prompt_logprobs  # () for a one-token prompt
                if delta.finish_reason is not None:
                    return Completion(
                        "".join(parts),
                        delta.finish_reason,
                        delta.completion_tokens,
                        delta.stop_string,
                        delta.stop_token,
                        tuple(logprobs) if delta.logprobs is not None else None,
                        prompt,
                        tuple(ids),
                    )
        raise EngineError("the engine ended a sequence without a finish reason")


def _push(
    token_ids: list[int], detokenizer: IncrementalDetokenizer, matcher: StopMatcher, quiet: int = 0
) -> tuple[str, int]:
    """The text `token_ids` add, and how many of them count: with stop strings or stop tokens, a chunk of several
    tokens (the engine ran ahead of a slow client) is read token by token, so that the count and the
    log-probabilities end at the token that completed the stop string (or was a stop token), as they do when tokens
    come one by one. A stop token ends the text before its own (vLLM), or with it given `Stops.include`. The first
    `quiet` of them (vLLM's min_tokens not yet reached) can complete no stop string and are no stop token."""
    if not matcher.token_ids and (not matcher.active or (len(token_ids) < 2 and quiet <= 0)):
        return matcher.push(detokenizer.push(token_ids)), len(token_ids)
    parts: list[str] = []
    for used, token in enumerate(token_ids, 1):
        armed = used > quiet
        if armed and matcher.stops_at(token):
            own = detokenizer.push([token]) if matcher.include else ""
            parts.append(matcher.push(own + detokenizer.flush()) + matcher.end(token))
            return "".join(parts), used
        parts.append(matcher.push(detokenizer.push([token]), armed))
        if matcher.stopped:
            return "".join(parts), used
    return "".join(parts), len(token_ids)


def _take(pending: list[T] | None) -> tuple[T, ...] | None:
    """The entries (or tokens) gathered so far, handed to the delta about to be sent (which empties the list)."""
    if pending is None:
        return None
    taken = tuple(pending)
    pending.clear()
    return taken


def _for_choice(params: SamplingParams, index: int) -> SamplingParams:
    """Sample `index` of a request: its own seed, so n seeded samples are n different reproducible draws."""
    seed = choice_seed(params.seed, index)
    return params if seed == params.seed else dataclasses.replace(params, seed=seed)


async def _gather_all(coros: list[Any]) -> list[Any]:
    """Like asyncio.gather, but the first failure cancels the siblings instead of leaving them running."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
