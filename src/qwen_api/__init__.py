"""qwen-api: Qwen2-7B-Instruct (or any chat model) behind the seed's HTTP API, on a continuously batched engine."""

__version__ = "1.0.0"
