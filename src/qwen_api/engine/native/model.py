"""The Qwen2 / Llama network in plain PyTorch, over a flat stream of tokens from many sequences at once.

A step's tokens (every decoding sequence's last token, then chunks of prompts) are one 1-D stream `[T]`; each
layer writes its keys and values into the paged cache and reads attention back through it (`attention.py`),
so the network itself never knows which token belongs to which sequence. q/k/v and gate/up projections are
fused into one matrix each (fewer, larger matrix products: what a GPU wants); `weights.py` fills the slices.
Parameters are allocated uninitialised on the target device: `weights.py` overwrites every one of them.
Numerics follow transformers' Qwen2 (RMSNorm in fp32, rotary tables in fp32 cast to the model dtype), so greedy
tokens match its `generate` on the CPU in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen_api.engine.native.attention import AttentionMetadata, paged_attention, write_kv
from qwen_api.engine.native.config import ModelConfig
from qwen_api.engine.native.pointwise import Pointwise


def _param(*shape: int, device: torch.device, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device=device, dtype=dtype), requires_grad=False)


class Linear(nn.Module):
    """y = x W^T (+ b), allocated empty: random initialisation of 7B weights costs minutes and is overwritten."""

    def __init__(self, n_in: int, n_out: int, bias: bool, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = _param(n_out, n_in, device=device, dtype=dtype)
        self.bias = _param(n_out, device=device, dtype=dtype) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """Holds the weight and epsilon; the arithmetic is `pointwise.rms_norm` (eager or fused)."""

    def __init__(self, size: int, eps: float, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = _param(size, device=device, dtype=dtype)
        self.eps = eps


def rotary_tables(config: ModelConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_positions, head_dim] in fp32, halves repeated (the rotate-half layout)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    positions = torch.arange(config.max_position_embeddings, device=device, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]  # [P, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
    return emb.cos(), emb.sin()


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, ops: Pointwise, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.config, self.ops = config, ops
        c = config
        self.qkv_proj = Linear(c.hidden_size, c.q_size + 2 * c.kv_size, c.qkv_bias, device, dtype)
        self.o_proj = Linear(c.q_size, c.hidden_size, False, device, dtype)

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos: torch.Tensor,  # [T, D]
        sin: torch.Tensor,  # [T, D]
        k_cache: torch.Tensor,  # [blocks, block_size, KV, D]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        c = self.config
        tokens = x.size(0)
        q, k, v = self.qkv_proj(x).split([c.q_size, c.kv_size, c.kv_size], dim=-1)
        q, k = self.ops.rotary_qk(
            q.view(tokens, c.num_heads, c.head_dim), k.view(tokens, c.num_kv_heads, c.head_dim), cos, sin
        )
        write_kv(k_cache, v_cache, k, v.view(tokens, c.num_kv_heads, c.head_dim), meta.slot_mapping)
        out = paged_attention(q, k_cache, v_cache, meta, self.ops)  # [T, H, D]
        return self.o_proj(out.reshape(tokens, c.q_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, ops: Pointwise, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.ops = ops
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, False, device, dtype)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, False, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, ops: Pointwise, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.ops = ops
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device, dtype)
        self.self_attn = Attention(config, ops, device, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device, dtype)
        self.mlp = MLP(config, ops, device, dtype)

    def forward(self, x, cos, sin, k_cache, v_cache, meta):
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        attended = self.self_attn(self.ops.rms_norm(x, norm1.weight, norm1.eps), cos, sin, k_cache, v_cache, meta)
        h, x = self.ops.add_rms_norm(attended, x, norm2.weight, norm2.eps)  # x + attention, and its norm
        return x + self.mlp(h)


class CausalLM(nn.Module):
    """Qwen2ForCausalLM / LlamaForCausalLM: token ids and positions in, hidden states out; `logits` on demand."""

    def __init__(self, config: ModelConfig, device: torch.device, dtype: torch.dtype, fused: bool = False) -> None:
        super().__init__()
        self.config = config
        self.ops = Pointwise(fused)
        self.embed_tokens = _param(config.vocab_size, config.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(config, self.ops, device, dtype) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, device, dtype)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else _param(config.vocab_size, config.hidden_size, device=device, dtype=dtype)
        )
        cos, sin = rotary_tables(config, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],  # per layer
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, hidden]
        x = F.embedding(input_ids, self.embed_tokens)
        rope_cos, rope_sin = self.get_buffer("rope_cos"), self.get_buffer("rope_sin")  # typed, unlike attributes
        cos = rope_cos[positions].to(x.dtype)
        sin = rope_sin[positions].to(x.dtype)
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches, strict=True):
            x = layer(x, cos, sin, k_cache, v_cache, meta)
        return self.ops.rms_norm(x, self.norm.weight, self.norm.eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [S, hidden] -> [S, V] fp32
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        return F.linear(hidden, head).float()
