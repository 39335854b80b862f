"""MC1/MC2 scoring: the lm-eval definitions, prefix sharing is exact, edits change scores, bootstrap CIs."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import make_random_adapter
from trainer.data import Question
from trainer.evaluate import mc_metrics, paired_bootstrap_ci, score_edited, score_questions
from trainer.prompts import qa_context

Q = Question(0, "Is it?", ("Yes.", "Sure."), ("No.", "Never."), mc1_correct="Yes.", mc1_incorrect=("No.",))


def test_mc1_is_whether_the_correct_answer_scores_best_ties_going_to_it() -> None:
    assert mc_metrics(Q, {"Yes.": -1.0, "Sure.": -9.0, "No.": -2.0, "Never.": -9.0})[0] == 1.0
    assert mc_metrics(Q, {"Yes.": -3.0, "Sure.": -1.0, "No.": -2.0, "Never.": -9.0})[0] == 0.0
    assert mc_metrics(Q, {"Yes.": -2.0, "Sure.": -1.0, "No.": -2.0, "Never.": -9.0})[0] == 1.0


def test_mc2_is_the_normalised_probability_mass_of_correct_answers() -> None:
    ll = {"Yes.": math.log(0.2), "Sure.": math.log(0.1), "No.": math.log(0.3), "Never.": math.log(0.4)}
    assert mc_metrics(Q, ll)[1] == pytest.approx(0.3)


def naive_loglik(model, tokenizer, question: str, answer: str) -> float:  # type: ignore[no-untyped-def]
    ctx = tokenizer(qa_context(question), add_special_tokens=False)["input_ids"]
    cont = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ctx + cont])).logits[0].float(), -1)
    return float(sum(logp[len(ctx) + i - 1, t] for i, t in enumerate(cont)))


def test_shared_prefix_scoring_equals_scoring_each_full_sequence(tiny_model, char_tokenizer) -> None:  # type: ignore[no-untyped-def]
    q2 = Question(
        1, "Why not?", ("Because.",), ("No reason at all.", "Why."), mc1_correct="Because.", mc1_incorrect=("Why.",)
    )
    scores = score_questions(tiny_model, char_tokenizer, [Q, q2], progress=False)
    for question, score in zip([Q, q2], scores, strict=True):
        ll = {
            a: naive_loglik(tiny_model, char_tokenizer, question.question, a)
            for a in (*question.correct, *question.incorrect)
        }
        mc1, mc2 = mc_metrics(question, ll)
        assert score.mc1 == mc1 and score.mc2 == pytest.approx(mc2, abs=1e-4)


def test_edit_changes_scores_and_alpha_zero_does_not(tiny_model, char_tokenizer) -> None:  # type: ignore[no-untyped-def]
    base = score_questions(tiny_model, char_tokenizer, [Q], progress=False)
    adapter = make_random_adapter()
    zero = score_edited(tiny_model, char_tokenizer, [Q], adapter, [0, 1, 2, 3], 0.0, progress=False)
    strong = score_edited(tiny_model, char_tokenizer, [Q], adapter, [0, 1, 2, 3], 4.0, progress=False)
    assert zero[0].mc2 == pytest.approx(base[0].mc2, abs=1e-6)
    assert strong[0].mc2 != pytest.approx(base[0].mc2, abs=1e-4)
    assert score_questions(tiny_model, char_tokenizer, [Q], progress=False)[0].mc2 == base[0].mc2  # hooks detached


def test_paired_bootstrap_ci_brackets_the_mean_delta() -> None:
    base = [0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0] * 5
    edited = [1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0] * 5
    lo, hi = paired_bootstrap_ci(base, edited, samples=2000, seed=0)
    assert lo <= 0.25 <= hi and lo > 0
    assert paired_bootstrap_ci(base, base) == (0.0, 0.0)
