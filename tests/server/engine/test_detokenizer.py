"""Incremental detokenization and stop strings."""

from __future__ import annotations

from typing import Any

from server.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher


def stream(matcher: StopStringMatcher, pieces: list[str]) -> tuple[list[str], bool]:
    emitted = []
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        emitted.append(text)
        if stopped:
            return emitted, True
    emitted.append(matcher.flush())
    return emitted, False


def test_stop_string_split_over_pieces_is_never_emitted() -> None:
    emitted, stopped = stream(StopStringMatcher(["END"]), ["hello E", "N", "D and more"])
    assert stopped and "".join(emitted) == "hello "
    assert emitted[0] == "hello "  # "E" is held back: it may start "END"


def test_held_back_prefix_is_released_when_it_turns_out_harmless() -> None:
    emitted, stopped = stream(StopStringMatcher(["END"]), ["say E", "ND", "?"])
    assert stopped and "".join(emitted) == "say "
    emitted, stopped = stream(StopStringMatcher(["END"]), ["say E", "nd", "!"])
    assert not stopped and "".join(emitted) == "say End!"


def test_earliest_of_several_stop_strings_wins() -> None:
    emitted, stopped = stream(StopStringMatcher(["xyz", "b"]), ["a b xyz"])
    assert stopped and "".join(emitted) == "a "


def test_no_stop_strings_passes_text_through() -> None:
    assert stream(StopStringMatcher([]), ["a", "b"]) == (["a", "b", ""], False)


def test_incremental_decoding_equals_full_decoding(tiny_loaded: Any) -> None:
    tokenizer = tiny_loaded.tokenizer
    prompt = tokenizer.encode("Q: ")
    answer = [*tokenizer.encode("Hello, world!\nBye"), tokenizer.eos_token_id]
    detok = IncrementalDetokenizer(tokenizer, prompt)
    text = "".join(detok.add(t) for t in answer) + detok.flush()
    assert text == tokenizer.decode(answer, skip_special_tokens=True) == "Hello, world!\nBye"
