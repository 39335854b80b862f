"""``hpr-train eval-gen``: configurations, chat-MC edited exactly where serving edits, the HTTP run end to end on
the tiny model (a real ``hpr-serve`` subprocess), and bad input that fails before anything is written."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from hpr.editing import EditPlan, HPREditor
from hpr.model import load_model
from tests.conftest import make_random_adapter
from trainer.cli import main
from trainer.data import Question
from trainer.eval_gen import (
    ConfigError,
    EditConfig,
    base_perplexities,
    chat_prompt_ids,
    parse_config,
    served_perplexity,
)
from trainer.evaluate import mc_metrics, scope_contexts, score_questions
from trainer.gen_client import ChatAnswer

# --- configurations -------------------------------------------------------------------------------------------------


def test_parse_config() -> None:
    assert parse_config("chat") == EditConfig("chat", "chat")
    assert parse_config("c2=chat:layers=16,17,19:alpha=2:scope=generated") == EditConfig(
        "c2", "chat", "16,17,19", 2.0, "generated"
    )
    assert parse_config("x=qa:layers=10-14,20").layers == "10-14,20"
    assert parse_config("x=qa:alpha=1.5").hpr() == {"adapter": "qa", "alpha": 1.5}
    assert parse_config("x=qa:tokens=4").hpr() == {"adapter": "qa", "edit_tokens": 4}
    assert parse_config("x=qa:tokens=all").hpr() == {"adapter": "qa", "edit_tokens": "all"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("base=qa", "base"),
        ("x=qa:alpha=strong", "alpha"),
        ("x=qa:scope=prompt", "scope"),
        ("x=qa:depth=3", "bad field"),
        ("x=qa:tokens=0", "tokens must be"),
        ("x=qa:tokens=some", "tokens must be"),
        ("x=qa:alpha=1:alpha=2", "once"),
        ("bad name=qa", "expected"),
    ],
)
def test_bad_configs_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(text)


# --- chat-MC edits the positions serving edits ------------------------------------------------------------------------


def _chat_ids(tokenizer: Any, question: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _full_sequence_loglik(model: Any, editor: HPREditor, spec: Any, prompt: list[int], answer: list[int]) -> float:
    """Independent reference: the whole prompt + answer in one pass, the edited positions written out here (the
    plan's ``valid`` mask): scope ``all`` from 0, ``generated`` from the last prompt token; with ``edit_tokens`` N,
    up to the input that produces the N-th answer token."""
    ids = torch.tensor([prompt + answer])
    first = 0 if spec.scope == "all" else len(prompt) - 1
    end = len(ids[0]) if spec.tokens is None else len(prompt) - 1 + spec.tokens
    valid = torch.tensor([[first <= p < end for p in range(len(ids[0]))]])
    whole = dataclasses.replace(spec, scope="all", tokens=None)
    with torch.no_grad(), editor.apply(EditPlan([whole], valid=valid)):
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return float(sum(logp[len(prompt) + i - 1, t] for i, t in enumerate(answer)))


@pytest.mark.parametrize(("scope", "tokens"), [("all", None), ("generated", None), ("generated", 2), ("all", 3)])
def test_chat_mc_edits_the_positions_its_scope_edits_when_serving(  # type: ignore[no-untyped-def]
    tiny_model, char_tokenizer, scope: str, tokens: int | None
) -> None:
    questions = [
        Question(0, "Is it?", ("Yes.", "Sure."), ("No.",), mc1_correct="Yes.", mc1_incorrect=("No.",)),
        Question(1, "Why not?", ("Because.",), ("No reason.", "Why."), mc1_correct="Because.", mc1_incorrect=("Why.",)),
    ]
    prompts = [_chat_ids(char_tokenizer, q.question) for q in questions]
    editor = HPREditor(tiny_model, {"a": make_random_adapter()})
    try:
        spec = editor.resolve("a", "all", 3.0, scope, "all" if tokens is None else tokens)  # type: ignore[arg-type]
        got = score_questions(
            tiny_model,
            char_tokenizer,
            questions,
            scope_contexts(editor, spec),
            prompts=prompts,
            answer_prefix="",
            progress=False,
        )
        unedited = score_questions(
            tiny_model, char_tokenizer, questions, prompts=prompts, answer_prefix="", progress=False
        )
        for q, prompt, score, plain in zip(questions, prompts, got, unedited, strict=True):
            texts = [*q.correct, *q.incorrect]
            ll = {
                t: _full_sequence_loglik(
                    tiny_model, editor, spec, prompt, list(char_tokenizer(t, add_special_tokens=False)["input_ids"])
                )
                for t in texts
            }
            mc1, mc2 = mc_metrics(q, ll)
            assert score.mc2 == pytest.approx(mc2, abs=1e-5) and score.mc1 == mc1
            assert abs(math.log(score.mc2) - math.log(plain.mc2)) > 1e-3  # the edit does change the scores
        if tokens is not None:  # and the limit changes them too (the answers are longer than it)
            whole = score_questions(
                tiny_model,
                char_tokenizer,
                questions,
                scope_contexts(editor, dataclasses.replace(spec, tokens=None)),
                prompts=prompts,
                answer_prefix="",
                progress=False,
            )
            assert all(abs(math.log(a.mc2) - math.log(b.mc2)) > 1e-4 for a, b in zip(got, whole, strict=True))
    finally:
        editor.detach()


def test_scope_generated_leaves_the_prompt_unedited_but_its_last_token(tiny_model, char_tokenizer) -> None:  # type: ignore[no-untyped-def]
    q = Question(0, "Is it?", ("Yes.",), ("No.",), mc1_correct="Yes.", mc1_incorrect=("No.",))
    prompt = _chat_ids(char_tokenizer, q.question)
    editor = HPREditor(tiny_model, {"a": make_random_adapter()})
    try:
        gen = score_questions(
            tiny_model,
            char_tokenizer,
            [q],
            scope_contexts(editor, editor.resolve("a", "all", 3.0, "generated")),
            prompts=[prompt],
            answer_prefix="",
            progress=False,
        )
        every = score_questions(
            tiny_model,
            char_tokenizer,
            [q],
            scope_contexts(editor, editor.resolve("a", "all", 3.0, "all")),
            prompts=[prompt],
            answer_prefix="",
            progress=False,
        )
        assert abs(math.log(gen[0].mc2) - math.log(every[0].mc2)) > 1e-3
    finally:
        editor.detach()


# --- the whole command over HTTP ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gen_setup(tmp_path_factory: pytest.TempPathFactory, truthfulqa_dir: Path) -> dict[str, Path]:
    """The tiny llama (char tokenizer with a chat template), a random adapter for it and a 12-question TruthfulQA."""
    from tests.conftest import make_tiny_llama
    from tests.trainer.conftest import make_char_tokenizer

    root = tmp_path_factory.mktemp("eval-gen")
    model_dir = root / "tiny-llama"
    make_tiny_llama().save_pretrained(model_dir)
    make_char_tokenizer().save_pretrained(model_dir)
    adapter = make_random_adapter()
    adapter.config.base_model = str(model_dir)
    adapter.config.default_alpha, adapter.config.default_scope = 1.5, "generated"
    adapter.save(root / "run" / "checkpoint")
    data = root / "tqa"
    data.mkdir()
    records = json.loads((truthfulqa_dir / "mc_task.json").read_text())[:12]
    (data / "mc_task.json").write_text(json.dumps(records))
    (data / "ids_splits.json").write_text(json.dumps({"train": [0, 1, 2, 3], "eval": [4, 5, 6], "test": [8, 9]}))
    (data / "TruthfulQA.csv").write_bytes((truthfulqa_dir / "TruthfulQA.csv").read_bytes())
    chat = root / "chat.txt"
    chat.write_text("What is the capital of France?\nHow do I boil an egg?\n")
    return {"root": root, "model": model_dir, "run": root / "run", "data": data, "chat": chat}


def _args(s: dict[str, Path], *extra: str) -> list[str]:
    return [
        "eval-gen", "--out", str(s["run"]), "--model", str(s["model"]), "--device", "cpu", "--data-dir", str(s["data"]),
        "--chat-questions", str(s["chat"]), "--max-tokens", "6", "--bootstrap", "200", "--no-progress",
        "--concurrency", "4", "--threads", "1", *extra,
    ]  # fmt: skip


def test_eval_gen_answers_through_hpr_serve_and_scores_every_configuration(gen_setup: dict[str, Path]) -> None:
    s = gen_setup
    code = main(_args(s, "--split", "eval", "--config", "run", "--config", "strong=run:layers=all:alpha=3:scope=all"))
    assert code == 0
    text = (s["run"] / "eval_gen.json").read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON: undefined values are null
    report = json.loads(text)
    assert report["questions"] == 3 and report["chat_questions"] == 2 and report["split"] == "eval"
    # The server applied each adapter's own defaults when the configuration gave none.
    assert report["configs"]["run"]["applied"] == {
        "adapter": "run",
        "layers": [0, 1],
        "alpha": 1.5,
        "scope": "generated",
        "edit_tokens": "all",
    }
    assert report["configs"]["strong"]["applied"] == {
        "adapter": "run",
        "layers": [0, 1, 2, 3],
        "alpha": 3.0,
        "scope": "all",
        "edit_tokens": "all",
    }
    assert report["configs"]["base"]["applied"] is None
    assert report["prompt_token_mismatches"] == 0  # our chat template rendering is the server's
    rows = [json.loads(line) for line in (s["run"] / "answers.jsonl").read_text().splitlines()]
    assert [r["set"] for r in rows] == ["truthfulqa"] * 3 + ["general"] * 2
    assert [r["index"] for r in rows[:3]] == [4, 5, 6]
    for row in rows:
        assert set(row["answers"]) == {"base", "run", "strong"}
    for name in ("base", "run", "strong"):
        result = report["results"][name]["truthfulqa"]
        answers = [r["answers"][name] for r in rows[:3]]
        # Summaries are the means of the per-answer values in answers.jsonl.
        for metric in ("bleu_acc", "rougeL_acc", "rougeL_diff", "mc2"):
            key = f"chat_{metric}" if metric == "mc2" else metric
            assert result[key]["value"] == pytest.approx(sum(a[metric] for a in answers) / 3)
        assert result["fluency"]["non_answer"]["value"] == pytest.approx(sum(a["non_answer"] for a in answers) / 3)
        ppl = sorted(a["perplexity"] for a in answers if a["perplexity"] is not None)
        if ppl:
            assert result["fluency"]["median_perplexity"] == pytest.approx(ppl[len(ppl) // 2])
    # Deltas and CIs against the base for edits only; the base holds its own guard trivially.
    assert "delta" not in report["results"]["base"]["truthfulqa"]["bleu_acc"]
    strong = report["results"]["strong"]["truthfulqa"]["chat_mc2"]
    assert strong["delta_ci95"][0] <= strong["delta"] <= strong["delta_ci95"][1]
    assert set(report["results"]["strong"]["guard"]) == {"holds", "truthfulqa", "general"}
    # The edit reached the answers: at alpha 3 on every layer the random adapter changes what is generated.
    assert any(r["answers"]["strong"]["text"] != r["answers"]["base"]["text"] for r in rows)
    # The base's perplexities came with its answers, from the server's logprobs; scored again by this process's own
    # forward (no server, no batch of other rows), they agree.
    spoken = [r for r in rows if r["answers"]["base"]["text"]]
    assert spoken and report["perplexities_from_server"] == len(spoken)
    lm = load_model(str(s["model"]), "cpu", "float32")
    prompts = [chat_prompt_ids(lm.tokenizer, r["question"]) for r in spoken]
    again = base_perplexities(lm, prompts, [[r["answers"]["base"]["text"]] for r in spoken], 2048)
    assert [r["answers"]["base"]["perplexity"] for r in spoken] == pytest.approx([p for (p,) in again], rel=1e-4)


class _Pairs:
    """A tokenizer of one token per two characters."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        pieces = [text[i : i + 2] for i in range(0, len(text), 2)]
        return {"input_ids": [sum(ord(ch) << (16 * k) for k, ch in enumerate(p)) for p in pieces]}

    def decode(self, ids: list[int]) -> str:
        return "".join(chr((i >> (16 * k)) & 0xFFFF) for i in ids for k in range(2) if (i >> (16 * k)) & 0xFFFF)


def _answer(text: str, entries: list[tuple[str, float]], finish: str = "stop") -> ChatAnswer:
    return ChatAnswer(text, finish, 5, len(entries), None, tuple(entries))


def test_served_perplexity_only_when_the_tokens_are_the_scored_text() -> None:
    tok = _Pairs()  # "abcd" → "ab", "cd"
    # The stop token is the one entry past the text: dropped.
    assert served_perplexity(tok, _answer("abcd", [("ab", -1.0), ("cd", -3.0), ("<end>", -0.1)])) == pytest.approx(
        math.exp(2.0)
    )
    assert served_perplexity(tok, _answer("abc", [("ab", -1.0), ("c", -3.0)], "length")) == pytest.approx(math.exp(2.0))
    # Tokens that are not the re-tokenized text: scored again. The same text and count in another split ...
    assert served_perplexity(tok, _answer("abcd", [("a", -1.0), ("bcd", -3.0)], "length")) is None
    # ... another count, a stripped space, one token too many, no logprobs, no text.
    assert served_perplexity(tok, _answer("abcd", [("abcd", -1.0)])) is None
    assert served_perplexity(tok, _answer("abcd", [(" ab", -1.0), ("cd", -3.0)], "length")) is None
    assert served_perplexity(tok, _answer("abcd", [("ab", -1.0), ("cd", -3.0), ("e", -0.1)], "length")) is None
    assert served_perplexity(tok, ChatAnswer("abcd", "stop", 5, 2, None)) is None
    assert served_perplexity(tok, _answer("", [("<end>", -0.1)])) is None


def test_unknown_configuration_fails_before_anything_is_written(gen_setup: dict[str, Path], capsys: Any) -> None:
    s = gen_setup
    out = s["root"] / "fresh"
    out.mkdir()
    (out / "checkpoint").symlink_to(s["run"] / "checkpoint")
    args = _args(s, "--split", "eval", "--config", "x=nope")
    args[args.index("--out") + 1] = str(out)
    assert main(args) == 2
    assert "unknown adapter(s) ['nope']" in capsys.readouterr().err
    assert not (out / "eval_gen.json").exists() and not (out / "answers.jsonl").exists()


def test_missing_checkpoint_is_named(gen_setup: dict[str, Path], capsys: Any) -> None:
    s = gen_setup
    missing = s["root"] / "no-such-checkpoint"
    assert main(_args(s, "--adapter", f"x={missing}")) == 2
    assert str(missing) in capsys.readouterr().err


def test_run_dir_from_another_model_is_refused(gen_setup: dict[str, Path], capsys: Any) -> None:
    s = gen_setup
    other = make_random_adapter(hidden=32)
    other.save(s["root"] / "other")
    assert main(_args(s, "--adapter", f"x={s['root'] / 'other'}")) == 2
    err = capsys.readouterr().err
    assert "hidden_size=32" in err and "other" in err
    renamed = make_random_adapter()
    renamed.config.base_model = "some-other-model"
    renamed.save(s["root"] / "renamed")
    assert main(_args(s, "--adapter", f"x={s['root'] / 'renamed'}")) == 2
    assert "trained on 'some-other-model'" in capsys.readouterr().err


def test_split_without_references_is_refused(gen_setup: dict[str, Path], capsys: Any, tmp_path: Path) -> None:
    s = gen_setup
    data = tmp_path / "tqa"
    data.mkdir()
    for name in ("mc_task.json", "ids_splits.json"):
        (data / name).write_bytes((s["data"] / name).read_bytes())
    with (s["data"] / "TruthfulQA.csv").open(encoding="utf-8-sig", newline="") as fh:
        rows = list(csv.DictReader(fh))
    mc = json.loads((data / "mc_task.json").read_text())
    dropped = mc[8]["question"]
    with (data / "TruthfulQA.csv").open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(r for r in rows if r["Question"].strip() != dropped.strip())
    args = _args(s, "--split", "test")
    args[args.index("--data-dir") + 1] = str(data)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no generation references" in err and "[8]" in err
