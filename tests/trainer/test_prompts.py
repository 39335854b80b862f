"""Prompt formats: the seed's shuffled multiple-choice prompt, the evaluation-shaped QA prompt, encoding."""

from __future__ import annotations

import pytest

from trainer.data import Question
from trainer.errors import DataError
from trainer.prompts import QA_PRIMER, common_prefix_length, encode_question, mc_user_prompt, qa_context


def test_mc_prompt_lists_every_answer_shuffled_by_seed(small_questions: list[Question]) -> None:
    q = small_questions[2]
    prompt = mc_user_prompt(q, seed=0)
    assert prompt.startswith("Question: Is water wet?\nChoices:\nA. ") and prompt.endswith("\nAnswer:")
    for answer in (*q.correct, *q.incorrect):
        assert f". {answer}\n" in prompt
    assert prompt == mc_user_prompt(q, seed=0)
    assert any(mc_user_prompt(q, seed=s) != prompt for s in range(1, 6))


def test_qa_context_is_the_six_shot_primer_then_the_question() -> None:
    assert QA_PRIMER.count("Q: ") == 6 and QA_PRIMER.count("\nA: ") == 6
    assert qa_context("Why?") == QA_PRIMER + "\n\nQ: Why?\nA:"


def test_encoded_answers_continue_the_prompt_inside_the_chat_template(char_tokenizer, small_questions) -> None:  # type: ignore[no-untyped-def]
    q = small_questions[0]
    enc = encode_question(char_tokenizer, q, "chat")
    text = char_tokenizer.decode(list(enc.prompt_ids))
    assert text.startswith("<|im_start|>user\nWhat color") and text.endswith("<|im_start|>assistant\n")
    assert [char_tokenizer.decode(list(a)) for a in enc.answers] == [*q.correct, *q.incorrect]
    assert enc.labels == (1, 1, 0, 0)
    assert enc.pairs == ((0, 2), (0, 3), (1, 2), (1, 3))


def test_qa_format_answers_start_with_a_space(char_tokenizer, small_questions) -> None:  # type: ignore[no-untyped-def]
    enc = encode_question(char_tokenizer, small_questions[1], "qa")
    assert char_tokenizer.decode(list(enc.answers[0])) == " No, pigs cannot fly."
    assert char_tokenizer.decode(list(enc.prompt_ids)).endswith("Q: Can pigs fly?\nA:")


def test_chat_formats_need_a_chat_template(char_tokenizer, small_questions) -> None:  # type: ignore[no-untyped-def]
    import copy

    plain = copy.deepcopy(char_tokenizer)
    plain.chat_template = None
    with pytest.raises(DataError, match="chat template"):
        encode_question(plain, small_questions[0], "mc")


def test_common_prefix_leaves_at_least_one_token_per_sequence() -> None:
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert common_prefix_length([[7], [7, 8]]) == 0
