"""The native engine: Qwen2 (and plain Llama) in plain PyTorch over a paged KV cache, batched by our own scheduler.

Each module owns one concern: `config` reads config.json, `model` is the network, `weights` fills it from
safetensors, `kv_cache` holds the paged cache and its prefix index, `attention` reads the cache (SDPA on any
device, a Triton kernel in `triton_attention` on CUDA), `scheduler` decides what each step computes, `runner`
turns a step into tensors (and CUDA graphs), and `engine` is the contract with its worker thread (tokens are
drawn on the device by the shared `qwen_api.engine.sampler`). Nothing here imports FastAPI.
"""

from qwen_api.engine.native.config import SUPPORTED_MODEL_TYPES, supports_model_dir

__all__ = ["SUPPORTED_MODEL_TYPES", "supports_model_dir"]
