"""Incremental detokenization: never emit text that might be taken back, cut at stop strings."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from llmray_workloads.serve.text import IncrementalText, find_stop, stop_prefix_overlap

pytestmark = pytest.mark.unit


def byte_decode(ids: Sequence[int]) -> str:
    """A byte-level 'tokenizer': each token is one byte (like byte-level BPE's worst case)."""
    return bytes(ids).decode("utf-8", errors="replace")


def feed(text: IncrementalText, data: bytes) -> list[str]:
    return [text.push(b) for b in data]


def test_plain_text_streams_token_by_token() -> None:
    text = IncrementalText(byte_decode)
    assert feed(text, b"abc") == ["a", "b", "c"]
    assert text.flush() == ""
    assert text.text == "abc"


def test_multibyte_character_is_held_until_complete() -> None:
    text = IncrementalText(byte_decode)
    deltas = feed(text, "é€".encode())
    assert deltas == ["", "é", "", "", "€"]
    assert "".join(deltas) == "é€"


def test_incomplete_character_is_flushed_at_the_end() -> None:
    text = IncrementalText(byte_decode)
    assert feed(text, b"a\xe2\x82") == ["a", "", ""]
    assert text.flush() == "\ufffd"


def test_stop_string_split_across_tokens() -> None:
    text = IncrementalText(byte_decode, stops=["END"])
    deltas = feed(text, b"hi ENDING")
    assert "".join(deltas) == "hi "
    assert text.stopped
    assert text.text == "hi "
    assert text.flush() == ""


def test_stop_prefix_is_held_then_released_when_it_diverges() -> None:
    text = IncrementalText(byte_decode, stops=["END"])
    assert feed(text, b"xEN") == ["x", "", ""]
    assert text.push(ord("o")) == "ENo"
    assert not text.stopped


def test_held_stop_prefix_is_released_by_flush() -> None:
    text = IncrementalText(byte_decode, stops=["STOP"])
    assert "".join(feed(text, b"go ST")) == "go "
    assert text.flush() == "ST"


def test_earliest_of_several_stops_wins() -> None:
    text = IncrementalText(byte_decode, stops=["cd", "b"])
    assert "".join(feed(text, b"abcd")) == "a"
    assert text.text == "a"


def test_stop_at_the_very_start() -> None:
    text = IncrementalText(byte_decode, stops=["a"])
    assert text.push(ord("a")) == ""
    assert text.stopped and text.text == ""


def test_tokens_after_stop_are_ignored() -> None:
    text = IncrementalText(byte_decode, stops=["x"])
    feed(text, b"axbc")
    assert text.text == "a"


def test_window_decoding_matches_full_decoding_with_a_real_tokenizer(tiny_tokenizer: object) -> None:
    """Deltas joined equal decoding all ids at once (the window never loses or repeats text)."""
    tok = tiny_tokenizer
    ids = tok("Hello wörld — the river does not hurry. 東京", add_special_tokens=False)["input_ids"]  # type: ignore[operator]

    def decode(x: Sequence[int]) -> str:
        return str(tok.decode(list(x), skip_special_tokens=True))  # type: ignore[attr-defined]

    text = IncrementalText(decode)
    streamed = "".join(text.push(i) for i in ids) + text.flush()
    assert streamed == decode(ids)


@pytest.fixture(scope="module")
def tiny_tokenizer() -> object:
    from llmray_workloads.tiny import build_tokenizer

    return build_tokenizer()


@pytest.mark.parametrize(
    ("text", "stops", "overlap"),
    [
        ("abc", ["cde"], 1),
        ("abc", ["bcd"], 2),
        ("abc", ["xyz"], 0),
        ("abc", ["abc"], 0),
        ("aab", ["abx", "b"], 2),
    ],
)
def test_stop_prefix_overlap(text: str, stops: list[str], overlap: int) -> None:
    assert stop_prefix_overlap(text, stops) == overlap


def test_find_stop() -> None:
    assert find_stop("hello world", ["wor", "llo"]) == 2
    assert find_stop("hello", ["x"]) == -1
    assert find_stop("abcabc", ["abc"], start=1) == 3
