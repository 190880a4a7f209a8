"""Structured outputs and tool calling: JSON grammars enforced while decoding, and Qwen2-style tool calls.

`grammar` compiles a response format or a tool choice into an llguidance grammar (cached, off the event loop,
with a time limit) and wraps the per-sequence matcher the engines step; `tools` renders tool definitions into the
prompt and parses `<tool_call>` blocks back out. Nothing here imports FastAPI or an engine.
"""
