"""OpenAI-compatible routes: chat and text completions (plain and streamed) and the model list (in Anthropic's
shape for a request that carries `anthropic-version`, as the `anthropic` SDK's do).

Routes stay thin: validate what the schema cannot (model name, caps, context), convert to engine
parameters, and shape TextGenerator's output as OpenAI objects and chunks.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import uuid
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from qwen_api.api.deps import GeneratorDep, GuardDep, RuntimeDep, SettingsDep, log_outputs, log_prompt
from qwen_api.api.errors import ModelNotFound, anthropic_error_body, openai_error_payload
from qwen_api.api.guard import Guard
from qwen_api.api.logprobs import LogprobShape, TextOffsets, narrowed
from qwen_api.api.middleware import request_id_var
from qwen_api.api.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    Unsupported,
    _SamplingRequest,
    usage,
)
from qwen_api.api.prompts import chat_prompt
from qwen_api.api.sse import sse_response
from qwen_api.engine.bad_words import BadWords, bad_word_tokens
from qwen_api.engine.base import TokenLogprob
from qwen_api.settings import Settings
from qwen_api.structured.grammar import GrammarError
from qwen_api.structured.tools import CallRules
from qwen_api.textgen import Completion, PromptTooLong, TextDelta, TextGenerator

router = APIRouter(prefix="/v1")


class _Context:
    """What both completion routes need: the settings, the served name, a ready generator, the guard."""

    def __init__(self, settings: Settings, model_name: str, generator: TextGenerator, guard: Guard) -> None:
        self.settings, self.model_name, self.generator, self.guard = settings, model_name, generator, guard

    def validate(self, body: ChatCompletionRequest | CompletionRequest) -> None:
        if body.model != self.model_name:
            raise ModelNotFound(body.model, self.model_name)
        body.check_supported()

    async def serve(
        self,
        request: Request,
        body: ChatCompletionRequest | CompletionRequest,
        prompts: list[_Prompt],
        kind: str,
        response_id: str,
    ) -> dict[str, Any] | StreamingResponse:
        """Answer `prompts` (one, or a text completion's several: prompt k's sample j is choice k * n + j)."""
        generator = self.generator
        every = [p.ids for p in prompts]
        prompt_tokens = sum(map(len, every))
        requested = body.requested_max_tokens()
        if requested is None:  # as much as fits, up to the server's cap
            room = generator.engine.max_context_tokens - max(map(len, every))
            requested = max(1, min(self.settings.max_new_tokens_limit, room))
        # max_tokens 0 (with echo: the prompt and its log-probabilities alone): the engine reads the prompt in a
        # step that also draws a token, which the answer leaves out (and the metrics do not count); so the prompt
        # needs room for that one token in the context
        empty = requested == 0
        if empty and body.min_tokens:
            raise Unsupported("min_tokens", "an answer of max_tokens 0 has no tokens")
        requested = max(requested, 1)
        params = body.sampling_params(requested, generator.sampling_defaults, generator.vocab_size)
        for ids in every:
            try:
                generator.check_fits(ids, params.max_new_tokens)
            except PromptTooLong as exc:
                if not empty:
                    raise
                raise PromptTooLong(exc.prompt_tokens, exc.max_new_tokens, exc.limit, none_kept=True) from None
        if (grammar := body.grammar()) is not None:
            try:
                params = dataclasses.replace(params, constraint=await generator.grammars.compile(*grammar))
            except GrammarError as exc:
                raise Unsupported(exc.param, str(exc)) from None
        elif body.bad_words:  # a constraint too, where there is no grammar (`check_supported`)
            banned = bad_word_tokens(body.bad_words, generator.content_ids)
            params = dataclasses.replace(params, constraint=BadWords(banned) if banned else None)
        ticket = self.guard.admit(body.n * len(prompts), prompt_tokens)
        head = {"id": response_id, "created": int(time.time()), "model": body.model}
        each = [p for p in prompts for _ in range(body.n)]  # each choice's prompt
        shape = LogprobShape(generator, as_ids=body.return_tokens_as_token_ids)
        if body.stream:
            deltas = generator.stream_each(every, params, n=body.n, stop=body.stops(), observed=not empty)
            deltas = _emptied(deltas) if empty else deltas
            chunks = self.guard.stream(ticket, _chunks(deltas, body, kind, head, prompt_tokens, shape, each))
            return sse_response(chunks, openai_error_payload, error_event=None, on_close=ticket.release)
        work = generator.complete_each(every, params, n=body.n, stop=body.stops(), observed=not empty)
        results = await self.guard.complete(request, ticket, work)
        if empty:
            results = [_nothing_of(c) for c in results]
        log_outputs(self.settings, [c.text for c in results])
        return _response(kind, head, body, results, prompt_tokens, shape, each)


async def _context(settings: SettingsDep, runtime: RuntimeDep, generator: GeneratorDep, guard: GuardDep) -> _Context:
    """The routes' `_Context`, built on the event loop (a class as a dependency would run in the thread pool)."""
    return _Context(settings, runtime.model_name, generator, guard)


def _anthropic_model(request: Request, name: str, created: int) -> dict[str, Any] | None:
    """The served model as Anthropic's `ModelInfo` when the request is Anthropic's (its SDK always sends an
    `anthropic-version` header), else None: OpenAI's clients get OpenAI's model object. Its `created_at` is the
    instant OpenAI's `created` gives, in RFC 3339."""
    if "anthropic-version" not in request.headers:
        return None
    created_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))
    return {"type": "model", "id": name, "display_name": name, "created_at": created_at, "lifecycle": "active"}


@router.get("/models", response_model=None)
async def list_models(request: Request, runtime: RuntimeDep) -> dict[str, Any] | JSONResponse:
    if (info := _anthropic_model(request, runtime.model_name, runtime.created)) is not None:
        limit = request.query_params.get("limit", "20")
        if not (limit.isascii() and limit.isdigit() and 1 <= int(limit[:5]) <= 1000):  # Anthropic's page sizes
            message = f"limit: must be an integer from 1 to 1000, not {limit[:40]!r}"
            return JSONResponse(anthropic_error_body(message, "invalid_request_error"), status_code=400)
        # One model: no page after it or before it, so a cursor (`after_id`, `before_id`) pages to an empty list.
        cursor = "after_id" in request.query_params or "before_id" in request.query_params
        data = [] if cursor else [info]
        first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
        return {"data": data, "has_more": False, "first_id": first, "last_id": last}
    model = {"id": runtime.model_name, "object": "model", "created": runtime.created, "owned_by": "qwen-api"}
    return {"object": "list", "data": [model]}


@router.get("/models/{model_id:path}", response_model=None)
async def retrieve_model(model_id: str, request: Request, runtime: RuntimeDep) -> dict[str, Any] | JSONResponse:
    info = _anthropic_model(request, runtime.model_name, runtime.created)
    if model_id != runtime.model_name:
        if info is not None:  # the error handlers answer in OpenAI's shape on this path
            message = str(ModelNotFound(model_id, runtime.model_name))
            return JSONResponse(anthropic_error_body(message, "not_found_error"), status_code=404)
        raise ModelNotFound(model_id, runtime.model_name)
    if info is not None:
        return info
    return {"id": runtime.model_name, "object": "model", "created": runtime.created, "owned_by": "qwen-api"}


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, ctx: Annotated[_Context, Depends(_context)]
) -> dict[str, Any] | StreamingResponse:
    ctx.validate(body)
    generator, tools = ctx.generator, body.tool_dicts()
    chat, generation_prompt, prefill = body.shaped(body.messages)
    extra = body.template_kwargs()
    messages, prompt_ids = await generator.off_loop(
        lambda: chat_prompt(generator, chat, tools, generation_prompt, prefill, extra)
    )
    log_prompt(ctx.settings, messages)
    prompt = _Prompt(body.truncated(prompt_ids, generator.engine.max_context_tokens), body.echoed())
    return await ctx.serve(request, body, [prompt], "chat.completion", f"chatcmpl-{_request_id(body)}")


@router.post("/completions", response_model=None)
async def completions(
    body: CompletionRequest, request: Request, ctx: Annotated[_Context, Depends(_context)]
) -> dict[str, Any] | StreamingResponse:
    ctx.validate(body)
    generator = ctx.generator
    prompts: list[_Prompt] = []
    for prompt in body.prompts():
        text: str | None = None
        if isinstance(prompt, str):
            text, ids = prompt, await generator.off_loop(functools.partial(generator.text_prompt_ids, prompt))
        else:  # token ids
            if outside := [t for t in prompt if t >= generator.vocab_size]:
                raise Unsupported("prompt", f"token id {outside[0]} is outside this model's vocabulary")
            ids = prompt
        if (kept := body.truncated(ids, generator.engine.max_context_tokens)) is not ids:
            ids, text = kept, None  # truncated as the request asks: its text is what is left
        if text is None and (body.echo or ctx.settings.log_prompts):  # the text of ids, where it is shown
            text = await generator.off_loop(functools.partial(generator.decode_all, ids))
        log_prompt(ctx.settings, text if text is not None else ids)
        prompts.append(_Prompt(ids, text if body.echo else None))
    return await ctx.serve(request, body, prompts, "text_completion", f"cmpl-{_request_id(body)}")


def _request_id(body: _SamplingRequest) -> str:
    """The answer's id after its prefix: vLLM's `request_id` where the request gives one, else the request's
    X-Request-ID (the client's own, or the one the server made for it: the logs' id), as vLLM reads that header."""
    if body.request_id is not None:
        return body.request_id
    given = request_id_var.get()
    return given if given != "-" else uuid.uuid4().hex


@dataclasses.dataclass(frozen=True)
class _Prompt:
    """One prompt to answer: its token ids, and with `echo` the text its answers repeat before their own (a text
    completion's prompt; on chat, the last message's content: `ChatCompletionRequest.echoed`)."""

    ids: list[int]
    echo: str | None = None


def _nothing_of(c: Completion) -> Completion:
    """An answer of max_tokens 0: no text and no tokens (the one the engine drew is left out), the prompt's
    log-probabilities kept."""
    return Completion(
        "", "length", 0, logprobs=() if c.logprobs is not None else None, prompt_logprobs=c.prompt_logprobs
    )


async def _emptied(deltas: AsyncGenerator[TextDelta, None]) -> AsyncGenerator[TextDelta, None]:
    """`_nothing_of` for a stream: each sequence's one delta, with nothing of its token."""
    prompts: dict[int, tuple[TokenLogprob, ...]] = {}  # each sequence's, until its finish carries them
    async with aclosing(deltas):
        async for d in deltas:
            if d.prompt_logprobs is not None:
                prompts[d.index] = d.prompt_logprobs
            if d.finish_reason is not None:
                empty = () if d.logprobs is not None else None
                yield TextDelta(d.index, "", "length", 0, logprobs=empty, prompt_logprobs=prompts.get(d.index))


def _call_rules(body: _SamplingRequest) -> CallRules | None:
    """How a chat answer splits into content and calls (None: no tools, or a text completion)."""
    return body.call_rules() if isinstance(body, ChatCompletionRequest) else None


def _response(
    kind: str,
    head: dict[str, Any],
    body: _SamplingRequest,
    results: list[Completion],
    prompt_tokens: int,
    logprobs: LogprobShape,
    prompts: list[_Prompt],
) -> dict[str, Any]:
    rules = _call_rules(body)
    out = {
        **head,
        "object": kind,
        "choices": [_choice(kind, i, c, body, rules, logprobs, prompts[i]) for i, c in enumerate(results)],
        "usage": usage(prompt_tokens, sum(c.completion_tokens for c in results)),
    }
    if kind == "chat.completion":  # vLLM's: one prompt, so these are the response's rather than each choice's
        out.update(_prompt_fields(body, prompts[0].ids, results[0].prompt_logprobs, logprobs))
    return out


def _prompt_fields(
    body: _SamplingRequest, ids: list[int], scored: Sequence[TokenLogprob] | None, logprobs: LogprobShape
) -> dict[str, Any]:
    """vLLM's `prompt_token_ids` and `prompt_logprobs`, where the request asked for them."""
    out: dict[str, Any] = {}
    if body.prompt_logprobs is not None and scored is not None:
        out["prompt_logprobs"] = logprobs.vllm_prompt(ids, scored, body.prompt_logprobs)
    if body.return_token_ids:
        out["prompt_token_ids"] = list(ids)
    return out


def _choice(
    kind: str,
    index: int,
    c: Completion,
    body: _SamplingRequest,
    rules: CallRules | None,
    logprobs: LogprobShape,
    prompt: _Prompt,
) -> dict[str, Any]:
    ids = {"token_ids": list(c.token_ids)} if body.return_token_ids else {}
    if kind == "chat.completion":
        message: dict[str, Any] = {"role": "assistant", "content": c.text}
        finish: str = c.finish_reason
        if rules is not None and (parsed := rules.split(c.text)).tool_calls:
            message = {"role": "assistant", "content": parsed.content, "tool_calls": parsed.tool_calls}
            finish = "tool_calls"
        elif rules is not None:  # no call; a call cut off by the token limit is not shown as text
            message["content"] = parsed.content or ""
        if prompt.echo is not None:
            message["content"] = prompt.echo + (message["content"] or "")
        chat, reason = logprobs.chat(c.logprobs), _stop_reason(c)
        return {
            "index": index,
            "message": message,
            "finish_reason": finish,
            "stop_reason": reason,
            "logprobs": chat,
            **ids,
        }
    text, legacy = c.text, logprobs.legacy(c.logprobs)
    if prompt.echo is not None:
        text = prompt.echo + c.text
        legacy = logprobs.legacy(c.logprobs, prompt=(prompt.ids, _echoed(body, c.prompt_logprobs)))
    choice = {"index": index, "text": text, "finish_reason": c.finish_reason, "stop_reason": _stop_reason(c)}
    choice["logprobs"] = legacy
    return {**choice, **_prompt_fields(body, prompt.ids, c.prompt_logprobs, logprobs), **ids}


def _stop_reason(c: Completion | TextDelta) -> str | int | None:
    """vLLM's `stop_reason`: the stop string or the stop token (`stop_token_ids`) that ended the answer; null
    when it ended otherwise (an end token, the token limit)."""
    return c.stop_string if c.stop_string is not None else c.stop_token


def _echoed(body: _SamplingRequest, scored: Sequence[TokenLogprob] | None) -> Sequence[TokenLogprob] | None:
    """An echoed prompt's entries with the alternatives its `logprobs` asks for (`prompt_logprobs` may want more)."""
    return narrowed(scored, body.logprobs_wanted() or 0)


async def _chunks(
    deltas: AsyncGenerator[TextDelta, None],
    body: _SamplingRequest,
    kind: str,
    head: dict[str, Any],
    prompt_tokens: int,
    logprobs: LogprobShape,
    prompts: list[_Prompt],
) -> AsyncGenerator[dict[str, Any], None]:
    """OpenAI chunks: for chat a role chunk first per choice, then content deltas, then a finish chunk. An echoed
    prompt (text completions) leads each choice's first chunk, with its log-probabilities. With vLLM's
    `return_token_ids`, the prompt's ids come once (chat: on the role chunks; text: on each choice's first chunk) and
    each chunk that carries content or the finish carries the tokens received since the one before, as the
    log-probabilities go."""
    chat = kind == "chat.completion"
    obj = "chat.completion.chunk" if chat else "text_completion"
    with_usage, continuous = body.include_usage(), body.continuous_usage()

    wanted = body.logprobs_wanted() is not None
    # Per choice: log-probability entries and token ids not sent yet, and (legacy shape) where its text stands
    # before them.
    choices = len(prompts)  # n for each prompt
    entries: list[list[TokenLogprob]] = [[] for _ in range(choices)]
    ids: list[list[int]] = [[] for _ in range(choices)]
    offsets = [TextOffsets() for _ in range(choices)]
    unsent = [body.return_token_ids] * choices  # the prompt's ids, not sent yet
    generated = [0] * choices  # tokens so far (`continuous_usage_stats`)

    def usage_now(index: int) -> dict[str, Any]:
        """A chunk's usage field, where the request asked for usage: null, or with vLLM's continuous_usage_stats
        the choice's counts so far (its prompt's tokens and its own)."""
        if not with_usage:
            return {}
        return {"usage": usage(len(prompts[index].ids), generated[index]) if continuous else None}

    def chunk(
        index: int,
        text: str | None,
        finish: str | None,
        first: bool = False,
        prompt: tuple[list[int], Sequence[TokenLogprob] | None] | None = None,
        echo: bool = False,
        reason: str | int | None = None,
    ) -> dict[str, Any]:
        """One choice's chunk; the last (`finish`) carries vLLM's `stop_reason` (`reason`)."""
        taken: list[TokenLogprob] | None = None
        extra: dict[str, Any] = {"stop_reason": reason} if finish is not None else {}
        if not (first or echo) and (text or finish):  # a chunk with content (or the last) takes what is pending
            if wanted:
                taken, entries[index] = entries[index], []
            if body.return_token_ids:
                extra["token_ids"], ids[index] = ids[index], []
        prompt_ids: dict[str, Any] = {}
        if unsent[index] and (first or not chat):
            unsent[index] = False
            prompt_ids = {"prompt_token_ids": list(prompts[index].ids)}
        if chat:  # the prompt's ids are the chunk's (one prompt), the rest the choice's
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            chat_lp = logprobs.chat(taken)
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": chat_lp, **extra}
            return {**head, "object": obj, "choices": [choice], **prompt_ids, **usage_now(index)}
        legacy = logprobs.legacy(taken, offsets[index], prompt)
        choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": legacy}
        choice.update(extra | prompt_ids)
        return {**head, "object": obj, "choices": [choice], **usage_now(index)}

    rules = _call_rules(body) if chat else None
    # with tools, per choice: its text, held back where it may be (the start of) a <tool_call>
    calls_in = [rules.stream() for _ in range(choices)] if rules is not None else None

    def tool_chunks(index: int, finish: str, reason: str | int | None) -> list[dict[str, Any]]:
        """The end of a choice with tools: the rest of its content, then its calls, then the finish (with its
        `stop_reason`, as the plain answer's)."""
        assert calls_in is not None
        rest, calls = calls_in[index].finish()
        out = [chunk(index, rest, None)] if rest else []
        if not calls:  # its text, but a call cut off by the token limit (`parse_tool_calls`)
            return [*out, chunk(index, None, finish, reason=reason)]
        for k, call in enumerate(calls):
            delta = {"tool_calls": [{"index": k, **call}]}
            choice = {"index": index, "delta": delta, "finish_reason": None, "logprobs": None}
            out.append({**head, "object": obj, "choices": [choice], **usage_now(index)})
        return [*out, chunk(index, None, "tool_calls", reason=reason)]

    completion_tokens = 0
    try:
        if chat:
            for i in range(choices):
                yield chunk(i, None, None, first=True)
            for i, p in enumerate(prompts):  # vLLM's chat echo: the last message's content, before the answer's
                if p.echo is not None:
                    yield chunk(i, p.echo, None, echo=True)  # no tokens of the answer's: none of theirs
        echoing = [p.echo is not None and not chat for p in prompts]
        async for d in deltas:
            entries[d.index].extend(d.logprobs or ())
            ids[d.index].extend(d.token_ids)
            generated[d.index] += len(d.token_ids)
            if calls_in is not None:
                if text := calls_in[d.index].feed(d.text):
                    yield chunk(d.index, text, None)
            elif echoing[d.index]:  # the prompt first, then what came
                echoing[d.index] = False
                echo = prompts[d.index]
                scored = _echoed(body, d.prompt_logprobs)
                yield chunk(d.index, f"{echo.echo}{d.text}", None, prompt=(echo.ids, scored))
            elif d.text:
                yield chunk(d.index, d.text, None)
            if d.finish_reason is not None:
                completion_tokens += d.completion_tokens
                if calls_in is not None:
                    for c in tool_chunks(d.index, d.finish_reason, _stop_reason(d)):
                        yield c
                else:
                    yield chunk(d.index, None, d.finish_reason, reason=_stop_reason(d))
        if with_usage:
            yield {**head, "object": obj, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}
    finally:
        await deltas.aclose()
