"""The prompt of a chat: the one rule of every chat-shaped route (chat completions, /tokenize, and the Responses
and Messages routes, whose items and blocks become `ChatMessage`s first), so that a conversation is the same
tokens whichever dialect sends it, and is counted as it is answered."""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateError

from qwen_api.api.openai_protocol import ChatMessage, Unsupported
from qwen_api.structured.tools import render_history, template_renders_tools
from qwen_api.textgen import TemplateMismatch, TextGenerator


def chat_prompt(
    generator: TextGenerator,
    chat: list[ChatMessage],
    tools: list[dict[str, Any]] | None,
    generation_prompt: bool = True,
    prefill: str | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> tuple[list[dict[str, str]], list[int]]:
    """A chat's messages as the template gets them and its prompt ids, with `tools` shown to the model (None: no
    tools): tool calls and results rendered as the model's format, and the tools block by the model's own template
    when it renders one, else by ours. The ids end with the assistant turn's opener (unless not
    `generation_prompt`), then `prefill`, the start of the answer, as plain text (control tokens typed in it stay
    characters, as in any message). `template_kwargs` (vLLM's `chat_template_kwargs`) are more variables for the
    template. A conversation the template refuses (its `raise_exception`), or variables it cannot compute with,
    are the request's error, `Unsupported`."""
    model_renders = template_renders_tools(getattr(generator.tokenizer, "chat_template", None))
    messages = render_history([m.as_dict() for m in chat], tools, own_block=not model_renders)
    try:
        ids = generator.chat_prompt_ids(messages, tools if model_renders else None, generation_prompt, template_kwargs)
    except (TemplateError, TemplateMismatch) as exc:
        field = "chat_template_kwargs" if template_kwargs else "messages"
        raise Unsupported(field, f"the model's chat template cannot render this conversation: {exc}") from None
    except Exception as exc:  # a request's variable the template cannot compute with (`budget // 2` of a string)
        if not template_kwargs:
            raise
        why = f"{type(exc).__name__}: {exc}"
        raise Unsupported("chat_template_kwargs", f"the model's chat template cannot render them: {why}") from None
    return messages, ids + generator.content_ids(prefill) if prefill else ids
