"""Incremental detokenisation and stop strings, on the real Qwen2 vocabulary (CJK and emoji split into bytes)."""

from __future__ import annotations

import pytest

from qwen_api.detokenize import REPLACEMENT, IncrementalDetokenizer, StopMatcher, Stops

MIXED = "你好，世界！犇 嵇 𠀀𪚥龘 are rare characters. 🦜🧬🫠🎉👍🏽 Émoji and English, 日本語も。"


@pytest.fixture(scope="module")
def qwen_tokenizer():  # type: ignore[no-untyped-def]
    from qwen_api.dev.random_qwen2 import build_qwen2_tokenizer

    return build_qwen2_tokenizer()


def test_cjk_and_emoji_split_across_tokens_stream_whole(qwen_tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = qwen_tokenizer(MIXED, add_special_tokens=False)["input_ids"]
    # The premise: some single tokens are not valid UTF-8 on their own.
    assert any(REPLACEMENT in qwen_tokenizer.decode([i]) for i in ids)
    detok = IncrementalDetokenizer(qwen_tokenizer)
    deltas = [detok.push([i]) for i in ids] + [detok.flush()]
    assert all(REPLACEMENT not in d for d in deltas)
    assert "".join(deltas) == MIXED


def test_special_tokens_are_skipped(qwen_tokenizer) -> None:  # type: ignore[no-untyped-def]
    im_end = qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")
    detok = IncrementalDetokenizer(qwen_tokenizer, skip_ids={im_end})
    ids = qwen_tokenizer("Paris.", add_special_tokens=False)["input_ids"]
    assert detok.push(ids) + detok.push([im_end]) + detok.flush() == "Paris."


@pytest.mark.parametrize(
    ("pieces", "stops", "emitted", "stopped"),
    [
        (["Hello", " wor", "ld"], ["STOP"], "Hello world", False),
        (["Hello ST", "O", "P and more"], ["STOP"], "Hello ", True),  # spans three chunks
        (["abc<", "|end", "|>tail"], ["<|end|>"], "abc", True),
        (["one\n\n", "two"], ["\n\n", "two"], "one", True),  # the earliest stop wins
        (["keep S", "TO"], ["STOP"], "keep STO", False),  # a held-back tail that never completes is released
        (["x", "y"], [], "xy", False),
    ],
)
def test_stop_strings_never_leak(pieces: list[str], stops: list[str], emitted: str, stopped: bool) -> None:
    matcher = StopMatcher(stops)
    out = []
    for piece in pieces:
        chunk = matcher.push(piece)
        for stop in stops:  # no emitted chunk ever carries the start of a stop string that later completes
            assert stop not in chunk
        out.append(chunk)
    out.append(matcher.flush())
    assert "".join(out) == emitted
    assert matcher.stopped is stopped


CALL = '<tool_call>{"name": "f", "arguments": {"q": "a STOP b"}}</tool_call>'
SHIELD = ("<tool_call>", "</tool_call>")
TRICKY = '<tool_call>{"name": "f", "arguments": {"html": "</tool_call> STOP"}}</tool_call>'


@pytest.mark.parametrize(
    ("text", "stops", "emitted", "matched"),
    [
        (f"Sure. {CALL} done", ["STOP"], f"Sure. {CALL} done", None),  # inside the block it does not count
        (f"{CALL} then STOP here", ["STOP"], f"{CALL} then ", "STOP"),  # after the block it does
        (f"a STOP {CALL}", ["STOP"], "a ", "STOP"),  # and before it
        (f"x{CALL}{CALL}y STOP", ["STOP", "q"], f"x{CALL}{CALL}y ", "STOP"),  # two blocks, one stop in each
        (f"<tool{CALL}", ["<tool"], "", "<tool"),  # a stop string that starts where a block would wins
        ('<tool_call>{"q": "STOP', ["STOP"], '<tool_call>{"q": "STOP', None),  # a block the sequence ends inside
        ("<tool_ca STOP", ["STOP"], "<tool_ca ", "STOP"),  # the start of a marker that never completes
        (f"{TRICKY} STOP", ["STOP"], f"{TRICKY} ", "STOP"),  # a closing marker in an argument closes nothing
        ('<tool_call>{"q": "a\\"</tool_call> STOP"}', ["STOP"], '<tool_call>{"q": "a\\"</tool_call> STOP"}', None),
        ('<tool_call>{"q": "a\\\\"}</tool_call> STOP', ["STOP"], '<tool_call>{"q": "a\\\\"}</tool_call> ', "STOP"),
    ],
)
def test_stop_strings_do_not_count_inside_a_shielded_block(
    text: str, stops: list[str], emitted: str, matched: str | None
) -> None:
    """With tools on, a stop string inside a `<tool_call>` block would cut the call; the text is fed whole, in
    pieces of 3, and a character at a time, with the same result each time."""
    for size in (len(text), 3, 1):
        matcher = StopMatcher(Stops(tuple(stops), SHIELD))
        out = [matcher.push(text[i : i + size]) for i in range(0, len(text), size)]
        out.append(matcher.flush())
        assert ("".join(out), matcher.matched) == (emitted, matched), size


@pytest.mark.parametrize(
    ("pieces", "emitted", "matched"),
    [
        ((["a STOP b ", "c"], ["STOP d"]), "a STOP b c", "STOP"),  # only an armed STOP counts
        ((["x ST"], ["OP y"]), "x ", "STOP"),  # one that begins before min_tokens and ends past it counts (vLLM's)
        ((["STOP", "ST"], ["OP"]), "STOP", "STOP"),
        ((["END"], ["!"]), "END!", None),
    ],
)
def test_unarmed_text_completes_no_stop_string(
    pieces: tuple[list[str], list[str]], emitted: str, matched: str | None
) -> None:
    """vLLM's min_tokens: the answer's first tokens can complete no stop string (`push(text, armed=False)`)."""
    matcher = StopMatcher(["STOP", "END"])
    quiet, armed = pieces
    out = [matcher.push(p, armed=False) for p in quiet] + [matcher.push(p) for p in armed] + [matcher.flush()]
    assert ("".join(out), matcher.matched) == (emitted, matched)


def test_without_a_shield_a_stop_string_cuts_inside_the_block() -> None:
    plain = StopMatcher(["STOP"])
    assert plain.push(f"Sure. {CALL}") == f"Sure. {CALL}".split("STOP")[0] and plain.matched == "STOP"
