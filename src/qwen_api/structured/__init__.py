"""Structured outputs and tool calling: JSON grammars enforced while decoding, and Qwen2-style tool calls.

`grammar` compiles a response format, vLLM's structured outputs or a tool choice into an llguidance grammar (cached,
off the event loop, its first compile in a child process that `sandbox` kills at a time limit) and wraps the
per-sequence matcher the engines step; `tools` renders tool definitions into the prompt, builds the call grammars
(forced, or `strict` under auto) and splits answers into text and calls (`CallRules`), plain or streamed. Nothing
here imports FastAPI or an engine.
"""
