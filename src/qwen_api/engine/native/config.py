"""What the native engine reads from a model's config.json, and which checkpoints it can serve.

Qwen2 / Qwen2.5 (q/k/v biases, no sliding window) and Llama without rope scaling share one network: RMSNorm,
rotary embeddings, grouped-query attention and a SwiGLU MLP. Anything else (rope scaling, sliding windows, MoE)
is refused here, so `--engine auto` falls back to the transformers engine instead of computing something else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("qwen2", "llama")


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def unsupported_reason(raw: dict[str, Any]) -> str | None:
    """Why the native engine cannot serve this config.json, or None when it can."""
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
    for rope in (raw.get("rope_parameters") or {}, raw.get("rope_scaling") or {}):
        if rope.get("rope_type", rope.get("type")) not in (None, "default"):
            return f"rope scaling {rope!r} is not implemented"
    if raw.get("use_sliding_window"):
        return "sliding-window attention is not implemented"
    if raw.get("mlp_bias"):
        return "MLP biases are not implemented"
    if raw.get("hidden_act", "silu") != "silu":
        return f"activation {raw.get('hidden_act')!r} is not implemented"
    return None


def _rope(raw: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 writes `rope_parameters` (theta inside); older checkpoints `rope_theta` and `rope_scaling`."""
    return dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})


def supports_model_dir(path: str | Path) -> bool:
    """True when `path/config.json` names an architecture this engine computes exactly."""
    try:
        raw = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return unsupported_reason(raw) is None


def load_config(path: str | Path) -> ModelConfig:
    raw = json.loads((Path(path) / "config.json").read_text())
    if (why := unsupported_reason(raw)) is not None:
        raise ValueError(f"the native engine cannot serve {path}: {why}")
    heads = int(raw["num_attention_heads"])
    hidden = int(raw["hidden_size"])
    return ModelConfig(
        model_type=raw["model_type"],
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(raw["intermediate_size"]),
        num_layers=int(raw["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or hidden // heads),
        rope_theta=float(raw.get("rope_theta") or _rope(raw).get("rope_theta") or 10000.0),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        # Qwen2 always has q/k/v biases (its config has no switch); Llama says so in attention_bias.
        qkv_bias=raw["model_type"] == "qwen2" or bool(raw.get("attention_bias", False)),
    )
