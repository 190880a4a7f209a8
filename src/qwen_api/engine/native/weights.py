"""Fill a `CausalLM` from a model directory's safetensors files, tensor by tensor, straight onto its device.

`safe_open(..., device=...)` reads each tensor onto the target device (no CPU copy of the model), where it is
cast to the model's dtype and copied into its slice of the fused parameters (q/k/v into `qkv_proj`, gate/up
into `gate_up_proj`). Peak extra memory is one checkpoint tensor. Every parameter must be filled: a
checkpoint that leaves one out is an error, never uninitialised memory served as weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from qwen_api.engine.native.model import CausalLM

# checkpoint suffix -> (our parameter suffix, which slice of the fused matrix)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", "q"),
    "self_attn.k_proj": ("self_attn.qkv_proj", "k"),
    "self_attn.v_proj": ("self_attn.qkv_proj", "v"),
    "mlp.gate_proj": ("mlp.gate_up_proj", "gate"),
    "mlp.up_proj": ("mlp.gate_up_proj", "up"),
}


def _slice(model: CausalLM, part: str) -> tuple[int, int]:
    c = model.config
    return {
        "q": (0, c.q_size),
        "k": (c.q_size, c.kv_size),
        "v": (c.q_size + c.kv_size, c.kv_size),
        "gate": (0, c.intermediate_size),
        "up": (c.intermediate_size, c.intermediate_size),
    }[part]


def _target(model: CausalLM, name: str) -> tuple[str, tuple[int, int] | None] | None:
    """Our parameter name (and row slice) for a checkpoint tensor name; None for tensors we do not use."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    if name == "lm_head.weight":
        return None if model.lm_head is None else ("lm_head", None)
    name = name.removeprefix("model.")
    if name == "embed_tokens.weight":
        return "embed_tokens", None
    for ours, (fused, part) in _FUSED.items():
        if f".{ours}." in name:
            return name.replace(ours, fused), _slice(model, part)
    return name, None


def load_weights(model: CausalLM, model_dir: str | Path) -> None:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {model_dir}")
    params = dict(model.named_parameters())
    device = next(iter(params.values())).device
    filled: dict[str, int] = {}  # parameter -> rows filled
    for file in files:
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                target = _target(model, name)
                if target is None:
                    continue
                ours, rows = target
                if ours not in params:
                    raise ValueError(f"{file.name}: unexpected tensor {name!r}")
                param = params[ours]
                tensor = f.get_tensor(name)
                dest = param.data if rows is None else param.data.narrow(0, rows[0], rows[1])
                if dest.shape != tensor.shape:
                    raise ValueError(f"{name}: shape {tuple(tensor.shape)} where {tuple(dest.shape)} is expected")
                with torch.no_grad():
                    dest.copy_(tensor)
                filled[ours] = filled.get(ours, 0) + tensor.size(0)
    missing = [name for name, p in params.items() if filled.get(name, 0) != p.size(0)]
    if missing:
        raise ValueError(f"{model_dir}: the checkpoint does not fill {missing[:5]}{'...' if len(missing) > 5 else ''}")
