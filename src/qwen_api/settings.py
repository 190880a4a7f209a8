"""The one settings schema: every field is a `--kebab-case` CLI flag and a `QWEN_API_*` environment variable.

CLI flags win over environment variables, which win over the defaults here. Limits that clients can hit
(caps on `max_length` and `num_return_sequences`) live here so that operators can tune them.
"""

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from qwen_api.engine.base import CPU_KV_CACHE_TOKENS, DEFAULT_MAX_BATCH_SIZE

DEFAULT_MODEL = "Qwen/Qwen2-7B-Instruct"


class Settings(BaseSettings):
    """Everything `qwen-api serve` can be told."""

    model_config = SettingsConfigDict(
        env_prefix="QWEN_API_", extra="forbid", cli_kebab_case=True, cli_implicit_flags=True
    )

    model: str = Field(
        DEFAULT_MODEL,
        description="Hugging Face hub id, local model directory, GGUF file, or 'demo' for the embedded "
        "SmolLM2-135M-Instruct.",
    )
    served_model_name: str | None = Field(
        None, description="Name reported by GET / and /v1/models, which requests name (default: from --model)."
    )
    host: str = Field("0.0.0.0", description="Interface to listen on.")
    port: int = Field(2025, ge=1, le=65535, description="TCP port to listen on.")
    engine: Literal["auto", "transformers", "llamacpp", "native"] = Field(
        "auto",
        description="auto: llama.cpp for a GGUF file on the CPU, native for Qwen2/Llama safetensors on CUDA, "
        "transformers otherwise (llamacpp: GGUF on CPU only; native: Qwen2/Llama model directories).",
    )
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto (CUDA when present), cpu, cuda, cuda:N."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto: bf16 where the GPU/CPU supports it (fp32 for GGUF on CPU), else fp16/fp32."
    )
    max_new_tokens_limit: int = Field(
        4096, ge=1, description="Largest max_length a request may ask for (further bounded by the context)."
    )
    max_num_return_sequences: int = Field(
        8, ge=1, le=256, description="Largest num_return_sequences a request may ask for."
    )
    max_batch_size: int = Field(
        DEFAULT_MAX_BATCH_SIZE, ge=1, description="Most sequences decoded together in one engine step."
    )
    max_waiting_sequences: int = Field(
        64,
        ge=0,
        description="Sequences that may wait for a batch slot; past max-batch-size plus these, requests get 429.",
    )
    request_timeout: float = Field(
        600.0, gt=0, description="Seconds a request may take; past it, it is cancelled and answered with an error."
    )
    drain_timeout: float = Field(
        30.0, ge=0, description="On SIGTERM, seconds to let admitted requests finish before exiting."
    )
    max_body_bytes: int = Field(2 * 1024 * 1024, ge=1024, description="Largest request body; beyond it, 413.")
    max_connections: int = Field(
        1024, ge=1, description="Open connections at most (bounded by file descriptors); past it, 503 and close."
    )
    header_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds a connection has to send a whole request (headers and body); past it, it is closed.",
    )
    api_key: SecretStr | None = Field(
        None,
        description="If set, /generate, /v1/*, /tokenize and /detokenize need 'Authorization: Bearer <key>' (or "
        "'x-api-key'); /, /health, /metrics and the playground page stay open.",
    )
    cors_allow_origins: list[str] = Field(
        default_factory=list, description="Origins allowed by CORS (none: CORS off). '*' allows any."
    )
    log_prompts: bool = Field(False, description="Log prompts and generated texts (off: they never reach logs).")
    playground: bool = Field(True, description="Serve the chat page at /playground (off: /playground is 404).")
    kv_cache_tokens: int | None = Field(
        None,
        ge=256,
        description="KV-cache capacity in tokens shared by all running sequences "
        f"(default: {CPU_KV_CACHE_TOKENS} on CPU, most of the free memory on GPU).",
    )
    prefix_cache: bool = Field(
        True,
        description="Reuse the KV of a prompt prefix another request computed (llama.cpp and native engines). Off: "
        "every request computes as a fresh run would, so greedy and seeded answers never depend on what ran before.",
    )
    fuse_kernels: bool = Field(
        True,
        description="Native engine, 16-bit model on CUDA: fuse the elementwise steps of each layer with torch.compile "
        "(off: eager kernels; a faster start, a slower decode step).",
    )
    prefill_delay: float = Field(
        0.0,
        ge=0,
        description="Native engine: while sequences decode, new prompts wait until the oldest has waited this many "
        "times the last prompt step's duration, and are read together (on CUDA a step with more than a few hundred "
        "prompt tokens runs without CUDA graphs). 0: every prompt is read at the next step.",
    )
    trust_remote_code: bool = Field(False, description="Allow model repos to run their own Python code.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    ray: bool = Field(False, description="Serve from engine replicas on a Ray cluster (Ray Serve) behind this front.")
    ray_address: str | None = Field(
        None, description="Ray cluster to join ('auto', 'HOST:6379'); none: start a local one (with --ray)."
    )
    replicas: int = Field(1, ge=1, description="With --ray: engine replicas (one engine and model each).")
    min_replicas: int | None = Field(
        None, ge=1, description="With --ray: autoscale from this many replicas (with --max-replicas)."
    )
    max_replicas: int | None = Field(
        None, ge=1, description="With --ray: autoscale up to this many replicas, on ongoing requests per replica."
    )

    def admission_capacity(self) -> int:
        """Sequences in flight at most: those decoding plus those waiting for a slot."""
        return self.max_batch_size + self.max_waiting_sequences
