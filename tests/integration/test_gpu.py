"""GPU checks: the transformers engine on CUDA in bf16. Marked `gpu`: deselected (and reported) without CUDA,
run on the lent device machine with `pytest -m gpu`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from qwen_api.engine.base import SamplingParams
from qwen_api.engine.loading import load_model, pick_dtype, resolve_model
from qwen_api.runtime import eos_token_ids

pytestmark = pytest.mark.gpu


def test_engine_on_cuda_batches_streams_and_honours_seeds(tiny_qwen2_dir: Path) -> None:
    import torch

    from qwen_api.engine.transformers_engine import TransformersEngine

    dtype = pick_dtype("auto", "cuda", is_gguf=False)
    assert dtype in (torch.bfloat16, torch.float16)
    model, tokenizer = load_model(resolve_model(str(tiny_qwen2_dir)), "cuda", dtype)
    engine = TransformersEngine(
        model, eos_token_ids(tokenizer, model.generation_config.eos_token_id), max_batch_size=16
    )
    try:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True
        )["input_ids"]

        async def run(params: SamplingParams) -> list[int]:
            return [t async for chunk in engine.generate(prompt, params) for t in chunk.token_ids]

        async def main() -> list[list[int]]:
            seeded = SamplingParams(max_new_tokens=16, temperature=1.0, seed=7)
            others = [SamplingParams(max_new_tokens=16, temperature=1.0) for _ in range(6)]
            return await asyncio.gather(run(seeded), *[run(p) for p in others], run(seeded))

        outputs = asyncio.run(main())
        assert all(1 <= len(o) <= 16 for o in outputs)
        assert outputs[0] == outputs[-1]
        assert engine.stats().peak_batch_size > 1
    finally:
        engine.shutdown()
