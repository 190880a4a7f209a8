"""Tool calling in the Qwen2 family's format: the tools system block, history rendering, the call grammar, parsing.

Qwen2-family models call a tool by writing `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`. When
the model's chat template renders `tools` itself (Qwen2.5's does) it is used; otherwise (Qwen2-7B-Instruct, the
demo SmolLM2) the server renders that same format's system block from its own text below, never from a request.
History is rendered as text the model was trained on: an assistant's calls as `<tool_call>` blocks and tool
results as `<tool_response>` blocks in a user turn. `required` or a named function becomes a grammar, so the call's
arguments always validate against the function's `parameters`; so does `auto` beside a `response_format`, whose
grammar lets the answer be either calls or content in that format.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from qwen_api.structured.grammar import GrammarError, checked_schema, compact_json

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_JSON = json.JSONDecoder()

_SYSTEM_BLOCK = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def template_renders_tools(chat_template: str | None) -> bool:
    """Whether a model's own chat template uses the `tools` variable (then it, not the server, renders them)."""
    return bool(chat_template) and re.search(r"\btools\b", str(chat_template)) is not None


def tools_system_block(tools: list[dict[str, Any]]) -> str:
    """The server's own Qwen2-format tools block, for templates that do not render tools."""
    return _SYSTEM_BLOCK.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))


def call_text(name: str, arguments: Any) -> str:
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': args}, ensure_ascii=False)}\n{CLOSE}"


def render_history(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, own_block: bool
) -> list[dict[str, str]]:
    """Plain role/content messages: calls and results as the format's text; with `own_block`, the tools block
    goes first in the system message (one is added when the conversation has none)."""
    out: list[dict[str, str]] = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = [call_text(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join([m.get("content") or "", *calls]).strip()})
        elif m["role"] == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1]["content"].startswith("<tool_response>"):
                out[-1] = {"role": "user", "content": out[-1]["content"] + "\n" + block}
            else:
                out.append({"role": "user", "content": block})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    if tools and own_block:
        block = tools_system_block(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + block}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


def _call_schema(tools: list[dict[str, Any]], loose: bool = False) -> dict[str, Any]:
    """The JSON schema of one call's `{"name", "arguments"}` to any of `tools`, the arguments following the
    function's `parameters` (with `loose`, only a strict function's; any object for the others)."""
    options, defs = [], {}
    for k, t in enumerate(tools):
        # a function without parameters (left out, or `{}`) takes none: its arguments are `{}`, as OpenAI's
        params = t["function"].get("parameters") or {"type": "object", "properties": {}, "additionalProperties": False}
        check_parameters(params, param="tools")  # a bad parameters schema is a 400 naming tools
        if loose and not t["function"].get("strict"):
            params = {"type": "object"}
        # Each function's schema sits under the call schema's $defs, its own references re-rooted there: a
        # reference such as "#/$defs/Item" (what pydantic writes for nested models) points into the schema it
        # was written in, not into the call schema around it.
        defs[f"function{k}"] = _rerooted(params, f"#/$defs/function{k}")
        options.append(
            {
                "type": "object",
                "properties": {"name": {"const": t["function"]["name"]}, "arguments": {"$ref": f"#/$defs/function{k}"}},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    return {**(options[0] if len(options) == 1 else {"anyOf": options}), "$defs": defs}


def _lark(rules: list[str]) -> str:
    from llguidance import LLMatcher

    try:
        return LLMatcher.grammar_from_lark("\n".join(rules) + "\n")
    except ValueError as exc:
        raise GrammarError(str(exc), "tools") from None


def call_grammar(
    tools: list[dict[str, Any]],
    name: str | None,
    content: dict[str, Any] | bool | None = None,
    parallel: bool = True,
) -> str:
    """The grammar of an answer that tools constrain, its JSON compact as `response_format`'s is:
    - `content` None: one call block, to `name` or (None: `required`) to any of `tools`;
    - `content` a JSON schema (`auto` with a `response_format`): either call blocks to any of `tools` (one, or
      several when `parallel`), or content that follows that schema."""
    chosen = [t for t in tools if name is None or t["function"]["name"] == name]
    rules = [
        f'block: "{OPEN}\\n" call "\\n{CLOSE}"',
        f"call: %json {json.dumps(compact_json(_call_schema(chosen)))}",
    ]
    if content is None:
        rules.insert(0, "start: block")
    else:
        calls = 'block ("\\n" block)*' if parallel else "block"
        rules[:0] = ["start: calls | content", f"calls: {calls}"]
        rules.append(f"content: %json {json.dumps(compact_json(content))}")
    return _lark(rules)


def strict_calls_grammar(tools: list[dict[str, Any]], parallel: bool = True) -> str:
    """`auto` with a `strict` function among `tools`: free text, in which each `<tool_call>` the model opens is a
    call to one of `tools` whose arguments follow that function's `parameters` when it is strict (any object when
    not), as OpenAI holds strict functions to their schema. The call's markup is as the model writes it, its
    newlines and closing tag optional (a small model may end its answer right after the JSON), its JSON compact.
    The text is a lazy lexeme (llguidance's structural tags): a mask over free text costs microseconds, but at
    the few steps where a `<` may begin the tag (about 1 ms there, on the 2-core VM, 152k-token vocabulary)."""
    call = compact_json(_call_schema(tools, loose=True))
    return _lark(
        [
            "%llguidance {}",
            f"start: call{'*' if parallel else '?'} TEXT",
            f'opened[lazy]: TEXT "{OPEN}"',
            f'call: opened "\\n"? %json {json.dumps(call)} ("\\n"? "{CLOSE}")?',
            r"TEXT: /(.|\n)*/",
        ]
    )


def tools_grammar(
    tools: list[dict[str, Any]] | None,
    forced: bool,
    name: str | None = None,
    content: dict[str, Any] | bool | None = None,
    parallel: bool = True,
) -> str | None:
    """The grammar tools put on an answer, the same rule on every dialect: a forced call (`required`, Anthropic's
    `any`, or the function `name`) is one call block; with `auto` beside a content format (its JSON schema
    `content`), calls or content in that format; with `auto` and a `strict` function, text whose calls follow
    their functions (`strict_calls_grammar`); else none (the content format's own grammar, if any, applies)."""
    if not tools:
        return None
    if forced:
        return call_grammar(tools, name)
    if content is not None:
        return call_grammar(tools, None, content, parallel=parallel)
    if any(t["function"].get("strict") for t in tools):
        return strict_calls_grammar(tools, parallel)
    return None


def check_parameters(schema: dict[str, Any] | None, param: str) -> None:
    """A function's `parameters` (Anthropic's `input_schema`): left out or empty (a function without parameters, as
    some clients send `{}`), or a valid JSON schema of an object, as its arguments are a JSON object (OpenAI and
    Anthropic refuse other types too). `GrammarError` naming `param`."""
    if schema is None or schema == {}:
        return
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise GrammarError('a function\'s arguments are a JSON object: its schema\'s "type" must be "object"', param)
    checked_schema(schema, param=param)


def check_functions(functions: list[tuple[str, dict[str, Any] | None]], schema_param: str) -> None:
    """What every dialect's tools must be, as (name, parameters schema) pairs: distinct names (each function is
    named by its calls), each schema an object's (`check_parameters`). `schema_param` names the i-th schema's field
    with `{i}` in it; `GrammarError` naming the field."""
    names = [name for name, _ in functions]
    if len(set(names)) != len(names):
        raise GrammarError("two tools have the same name: tool names must be unique", "tools")
    for i, (_, schema) in enumerate(functions):
        check_parameters(schema, schema_param.format(i=i))


def _rerooted(schema: Any, root: str) -> Any:
    """`schema` with each local JSON-pointer reference ("#", "#/...") made to start from `root` instead. A reference
    to an `$anchor` ("#name") stays: an anchor is found by its name wherever it sits in the document."""
    if isinstance(schema, list):
        return [_rerooted(v, root) for v in schema]
    if not isinstance(schema, dict):
        return schema
    return {k: root + v[1:] if k == "$ref" and _is_pointer(v) else _rerooted(v, root) for k, v in schema.items()}


def _is_pointer(ref: Any) -> bool:
    """Whether a `$ref` is a JSON pointer into its own document ("#", "#/..."), not an anchor's name or a URI."""
    return isinstance(ref, str) and (ref == "#" or ref.startswith("#/"))


@dataclass(frozen=True)
class ParsedOutput:
    content: str | None
    tool_calls: list[dict[str, Any]]


def parse_tool_calls(text: str, names: Collection[str] | None = None, parallel: bool = True) -> ParsedOutput:
    """Split a completion into its text and its calls (OpenAI's shape, with ids).

    A call is `<tool_call>`, then one JSON value `{"name": str, "arguments": object}` (the arguments may come as
    JSON text of an object), then `</tool_call>` or not (small models often stop before it, and a strict function's
    grammar lets text follow without it); its name one of `names` (any name when None). The JSON is read as JSON, so
    an argument may hold `</tool_call>` itself (HTML, code, a model quoting the format). A closed block that is no
    call stays in the content, as the model wrote it; so does a whole call to a function the request did not declare
    (its client could not run it), closed or not. A block left open that is no call, a call cut off by the token
    limit, ends the text: it is dropped, so the markup never reaches the content. Without `parallel` only the first
    call counts; the others are dropped. The text around the blocks is kept as written, but for the whitespace that
    ends it (or all of it, when it is only whitespace); the answer's own leading whitespace stays (as an answer
    without calls keeps it, and as a stream has already sent it)."""
    calls: list[dict[str, Any]] = []
    kept: list[str] = []
    last = at = 0
    while (start := text.find(OPEN, at)) >= 0:
        body, end = _json_at(text, _skip_space(text, start + len(OPEN)))
        closed = end >= 0 and text.startswith(CLOSE, _skip_space(text, end))
        block_end = _skip_space(text, end) + len(CLOSE) if closed else end
        call = _call_of(body) if end >= 0 else None
        if call is None:
            if closed:  # a whole block, but no call: text as written
                at = block_end
                continue
            if end < 0 and (close := text.find(CLOSE, start)) >= 0:  # no JSON value, but closed all the same
                at = close + len(CLOSE)
                continue
            kept.append(text[last:start])  # cut off: it ends the text
            last = len(text)
            break
        at = block_end
        name, args = call
        if names is not None and name not in names:
            continue  # whole, but to a function nobody declared: text as written
        kept.append(text[last:start])
        last = block_end
        if parallel or not calls:
            calls.append(
                {
                    "id": f"call_{uuid.uuid4().hex[:24]}",
                    "type": "function",
                    "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)},
                }
            )
    if not kept:
        return ParsedOutput(text, [])
    kept.append(text[last:])
    joined = "".join(kept)
    content = joined.rstrip() if kept[0].strip() else joined.strip()
    return ParsedOutput(content or None, calls)


def _skip_space(text: str, at: int) -> int:
    """Where the whitespace that starts at `at` ends."""
    return len(text) - len(text[at:].lstrip()) if at < len(text) else at


def _json_at(text: str, start: int) -> tuple[Any, int]:
    """The JSON value that starts at `start`, and where it ends; (None, -1) when none does (not JSON, or cut off)."""
    try:
        return _JSON.raw_decode(text, start)
    except (ValueError, RecursionError):  # RecursionError: nested past Python's stack, no call of any function
        return None, -1


def _call_of(body: Any) -> tuple[str, dict[str, Any]] | None:
    """(name, arguments) of a call's JSON value, or None when it is no call."""
    if not isinstance(body, dict) or not isinstance(name := body.get("name"), str):
        return None
    args = body.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):
            return None
    return (name, args) if isinstance(args, dict) else None


@dataclass(frozen=True)
class CallRules:
    """Which calls an answer may hold: to the functions the request declared (`names`), and more than one only
    when `parallel`; when `forced` (`required`, a named function), the answer is calls and nothing else, so whatever
    is no whole call (a call cut off by the token limit, even inside its `<tool_call>` tag) is dropped, never sent
    as text. Every dialect's route splits its answers by these, plain (`split`) or streamed (`stream`)."""

    names: frozenset[str]
    parallel: bool = True
    forced: bool = False

    @classmethod
    def of(cls, tools: list[dict[str, Any]] | None, parallel: bool = True, forced: bool = False) -> CallRules | None:
        """The rules for the function tools shown to the model (chat completions' shape); None without tools."""
        return cls(frozenset(t["function"]["name"] for t in tools), parallel, forced) if tools else None

    def split(self, text: str) -> ParsedOutput:
        parsed = parse_tool_calls(text, self.names, self.parallel)
        return ParsedOutput(None, parsed.tool_calls) if self.forced else parsed

    def stream(self) -> CallStream:
        return CallStream(self)


class CallStream:
    """One streamed answer that may hold calls, split as `CallRules.split` splits the whole answer, so that a
    stream and a plain answer always agree: `feed` says which text may go out now (all of it up to what may be
    the start of a `<tool_call>`, but for its trailing whitespace, which the text beside calls drops); `finish`
    gives the rest of the text (what follows the calls, or what was held back and turned out to be no call) and
    the calls. What went out plus the rest is exactly the split's content."""

    def __init__(self, rules: CallRules) -> None:
        self._rules = rules
        self.text = ""  # the answer so far
        self.sent = 0  # how much of it went out

    def feed(self, text: str) -> str:
        self.text += text
        if self._rules.forced:  # calls only: nothing is content
            return ""
        safe = len(self.text[: safe_prefix_len(self.text)].rstrip())
        if safe <= self.sent:
            return ""
        out, self.sent = self.text[self.sent : safe], safe
        return out

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        parsed = self._rules.split(self.text)
        content, streamed = parsed.content or "", self.text[: self.sent]
        # always a prefix (`feed` never passes the first block, nor the whitespace before it); checked all the same
        return (content[len(streamed) :] if content.startswith(streamed) else ""), parsed.tool_calls


def safe_prefix_len(text: str) -> int:
    """How much of streamed `text` may go out as content now: all of it up to a `<tool_call>` or a partial one."""
    at = text.find(OPEN)
    if at >= 0:
        return at
    for k in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-k:]):
            return len(text) - k
    return len(text)
