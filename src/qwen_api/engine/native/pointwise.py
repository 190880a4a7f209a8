"""The network's elementwise pieces, written once: eager (the reference numerics), or fused by `torch.compile`.

Between its matrix products, each decoder layer runs RMSNorm twice, rotary embeddings on q and k, a residual add
and SiLU(gate) * up, and the Triton decode kernel's splits are merged. Eager PyTorch runs each of these as
several small kernels (about 40 a layer); on a GPU at batch 1 each costs a few microseconds of a step whose
matrix products take about 4 ms, so together they cost more than a third of it. `torch.compile` fuses each
function into one or two Triton kernels; the CUDA graph then replays those.

Fusion is used for 16-bit models on CUDA (what serving runs), where its rounding is within bf16's own; fp32 and
the CPU keep the eager functions, whose numerics match transformers' Qwen2 bit for bit (the CPU tests compare
greedy tokens exactly). If compiling fails, the engine falls back to the eager functions (`ModelRunner`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Qwen2RMSNorm: normalised in fp32, cast back, then scaled."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): a residual add and the next norm in one pass."""
    total = x + residual
    return rms_norm(total, weight, eps), total


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D]; cos, sin [T, D] in x's dtype (the rotate-half layout)."""
    half = x.size(-1) // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def rotary_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return rotary(q, cos, sin), rotary(k, cos, sin)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def merge_splits(
    part_out: torch.Tensor,  # [B, H, S, D] fp32: each split's weighted values
    part_max: torch.Tensor,  # [B, H, S] fp32: each split's running max
    part_sum: torch.Tensor,  # [B, H, S] fp32: each split's softmax denominator
    dtype: torch.dtype,
) -> torch.Tensor:  # [B, H, D]
    """Merge flash-decoding's context splits; an empty split has max -inf and sum 0, so its weight is 0."""
    top = part_max.amax(dim=-1, keepdim=True)
    weight = torch.exp(part_max - top)
    total = (part_sum * weight).sum(dim=-1)
    return ((part_out * weight[..., None]).sum(dim=-2) / total[..., None]).to(dtype)


class Pointwise:
    """The elementwise functions one model uses: eager, or each wrapped in `torch.compile` (fused on first call)."""

    NAMES = ("rms_norm", "add_rms_norm", "rotary_qk", "silu_mul", "merge_splits")

    def __init__(self, fused: bool = False, backend: str = "inductor") -> None:
        self._set(fused, backend)

    def _set(self, fused: bool, backend: str = "inductor") -> None:
        self.fused = fused
        for name in self.NAMES:
            fn: Callable[..., Any] = globals()[name]
            setattr(self, name, torch.compile(fn, dynamic=True, fullgraph=True, backend=backend) if fused else fn)

    def unfuse(self) -> None:
        """Back to the eager functions, in place (every layer holds this object)."""
        self._set(False)

    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    add_rms_norm: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
    rotary_qk: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    silu_mul: Callable[[torch.Tensor], torch.Tensor]
    merge_splits: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype], torch.Tensor]

    @torch.inference_mode()
    def warm(self, model: Any) -> None:
        """Call every function once at 1 row and once at several (dynamic shapes specialise a dimension of 1), on
        tensors laid out as the network's own (q and k are views into the fused q/k/v product), in inference mode
        as the engine runs: fusion happens here, at load, where a failure can still fall back, and not inside a
        step or a graph capture."""
        c = model.config
        weight = model.norm.weight
        device, dtype, f32 = weight.device, weight.dtype, torch.float32
        for rows in (1, 3):
            x = torch.randn(rows, c.hidden_size, device=device, dtype=dtype)
            qkv = torch.randn(rows, c.q_size + 2 * c.kv_size, device=device, dtype=dtype)
            q, k, _ = qkv.split([c.q_size, c.kv_size, c.kv_size], dim=-1)
            cos = torch.randn(rows, c.head_dim, device=device, dtype=dtype)
            parts = torch.randn(rows, c.num_heads, 4, c.head_dim, device=device, dtype=f32)  # any count of splits
            top = torch.randn(rows, c.num_heads, 4, device=device, dtype=f32)
            self.rms_norm(x, weight, c.rms_norm_eps)
            self.add_rms_norm(x, x, weight, c.rms_norm_eps)
            self.rotary_qk(q.view(rows, c.num_heads, c.head_dim), k.view(rows, c.num_kv_heads, c.head_dim), cos, cos)
            self.silu_mul(torch.randn(rows, 2 * c.intermediate_size, device=device, dtype=dtype))
            self.merge_splits(parts, top, top.exp(), dtype)

    @staticmethod
    def wanted(device: torch.device, dtype: torch.dtype) -> bool:
        """Fuse for 16-bit models on CUDA; keep the reference numerics elsewhere."""
        return device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
