"""`POST /tokenize`, `POST /detokenize` and `GET /tokenizer_info`, as vLLM's and llama.cpp's servers have them.

`/tokenize` takes a raw `prompt` (tokenised as `/v1/completions` reads it) or chat `messages` and optional
`tools` (through the chat template with the generation prompt, tool calls and results rendered, exactly as
`/v1/chat/completions` counts them: `prompts.chat_prompt`, vLLM's `add_generation_prompt` and
`continue_final_message` included) and answers the ids, their
count and the model's context length. `/detokenize` turns ids back into text, special tokens included. Both
sit behind the API key and answer errors in OpenAI's shape: an empty input, an id outside the vocabulary or a
wrong type is a 400 that says which.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter
from pydantic import Field, model_validator

from qwen_api.api.deps import GeneratorDep, RuntimeDep
from qwen_api.api.errors import ModelNotFound, invalid_field
from qwen_api.api.openai_protocol import ChatMessage, ChatShaping, Tool
from qwen_api.api.prompts import chat_prompt
from qwen_api.api.schema import RequestModel
from qwen_api.runtime import Runtime

router = APIRouter()


class _Request(RequestModel):
    """Strict and closed (api/schema.py); a field sent as null takes its default."""

    null_means_default = True


class TokenizeRequest(_Request, ChatShaping):
    model: str | None = None
    prompt: str | None = Field(None, min_length=1)
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    tools: list[Tool] | None = None  # shown to the model as chat completions show them (with `messages` only)
    # vLLM's (lm-eval's remote tokenizer sends false): with `prompt`, whether the tokenizer's own special tokens
    # (a BOS, for tokenizers that have one) are added; left out or false, the prompt is read as /v1/completions reads it
    add_special_tokens: bool | None = None

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send either 'prompt' (text) or 'messages' (a chat), not both and not neither")
        if self.tools is not None and self.messages is None:
            raise ValueError("'tools' go with 'messages', not with a raw 'prompt'")
        if self.add_special_tokens and self.messages is not None:  # false, vLLM's default for a chat, is neutral
            raise ValueError("'add_special_tokens' true goes with a raw 'prompt'; a chat is read through its template")
        return self


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[Annotated[int, Field(strict=True, ge=0)]] = Field(..., min_length=1)


def _check_model(model: str | None, runtime: Runtime) -> None:
    if model is not None and model != runtime.model_name:
        raise ModelNotFound(model, runtime.model_name)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, runtime: RuntimeDep, generator: GeneratorDep) -> dict[str, Any]:
    _check_model(body.model, runtime)
    if body.messages is not None:
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        chat, generation_prompt, prefill = body.shaped(body.messages)
        extra = body.template_kwargs()
        _, ids = await generator.off_loop(
            lambda: chat_prompt(generator, chat, tools, generation_prompt, prefill, extra)
        )
    else:
        special = bool(body.add_special_tokens)
        ids = await generator.off_loop(lambda: generator.text_prompt_ids(body.prompt or "", special))
    return {"tokens": ids, "count": len(ids), "max_model_len": generator.engine.max_context_tokens}


@router.get("/tokenizer_info")
async def tokenizer_info(generator: GeneratorDep) -> dict[str, Any]:
    """The tokenizer's class, special tokens and chat template, as vLLM's `/tokenizer_info` has them: what a client
    needs to tokenise and template as this server does (lm-eval's remote tokenizer, chosen when this answers)."""
    tokenizer = generator.tokenizer

    def special(name: str) -> str | None:
        value = getattr(tokenizer, name, None)
        return None if value is None else str(value)

    return {
        "tokenizer_class": type(tokenizer).__name__,
        "eos_token": special("eos_token"),
        "bos_token": special("bos_token"),
        "pad_token": special("pad_token"),
        "unk_token": special("unk_token"),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "model_max_length": generator.engine.max_context_tokens,
        "vocab_size": len(tokenizer),
    }


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, runtime: RuntimeDep, generator: GeneratorDep) -> dict[str, str]:
    _check_model(body.model, runtime)
    vocabulary = len(generator.tokenizer)
    outside = [t for t in body.tokens if t >= vocabulary]
    if outside:
        message = f"token id {outside[0]} is outside this model's vocabulary (ids 0 to {vocabulary - 1})"
        raise invalid_field("tokens", message, outside[0])
    return {"prompt": generator.decode_all(body.tokens)}
