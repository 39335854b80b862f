"""``hpr-train`` end to end on the tiny random llama: every stage, resume, bad input, --help."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hpr.checkpoint import HPRAdapter
from trainer.cli import build_parser, main


def run_args(out: Path, model: Path, data: Path, *extra: str) -> list[str]:
    return [
        "run",
        "--out",
        str(out),
        "--model",
        str(model),
        "--data-dir",
        str(data),
        "--no-progress",
        "--epochs",
        "2",
        "--top-k",
        "2",
        "--bootstrap",
        "200",
        "--threads",
        "1",
        *extra,
    ]


def test_run_writes_checkpoint_eval_and_plot_then_resumes(tmp_path, tiny_model_dir, tiny_truthfulqa, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "run"
    assert main(run_args(out, tiny_model_dir, tiny_truthfulqa, "--format", "chat")) == 0
    adapter = HPRAdapter.load(out / "checkpoint", hidden_size=64, num_layers=4)
    assert adapter.config.layers == [0, 1, 2, 3] and len(adapter.config.selected_layers) == 2
    assert set(adapter.config.probe_accuracy) == {0, 1, 2, 3}
    assert (out / "checkpoint" / "probe_accuracy.png").is_file()
    report = json.loads((out / "eval.json").read_text())
    for metric in ("mc1", "mc2"):
        assert {"base", "edited", "delta", "delta_ci95"} <= set(report[metric])
    assert report["questions"] == 4 and len(report["per_question"]) == 4
    assert report["edit"] == {
        "layers": adapter.config.selected_layers,
        "alpha": 2.0,
        "scope": "all",
        "edit_tokens": "all",
    }
    assert (out / "activations" / "train" / "manifest.json").is_file()
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.suffix != ".png"}
    stamps.pop(out / "data.json")
    stamps.pop(out / "checkpoint" / "hpr_config.json")  # select rewrites it (same content)
    stamps.pop(out / "checkpoint" / "hpr_model.safetensors")
    capsys.readouterr()
    assert main(run_args(out, tiny_model_dir, tiny_truthfulqa, "--format", "chat")) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # nothing recomputed


def test_same_seed_gives_the_same_checkpoint(tmp_path, tiny_model_dir, tiny_truthfulqa) -> None:  # type: ignore[no-untyped-def]
    for name in ("a", "b"):
        assert main(run_args(tmp_path / name, tiny_model_dir, tiny_truthfulqa, "--format", "mc")) == 0
    a = (tmp_path / "a" / "checkpoint" / "hpr_model.safetensors").read_bytes()
    b = (tmp_path / "b" / "checkpoint" / "hpr_model.safetensors").read_bytes()
    assert a == b


def test_missing_data_is_a_clear_error(tmp_path, tiny_model_dir, capsys) -> None:  # type: ignore[no-untyped-def]
    code = main(run_args(tmp_path / "out", tiny_model_dir, tmp_path / "nowhere"))
    assert code == 2
    assert "nowhere/mc_task.json: file not found" in capsys.readouterr().err


def test_stage_before_its_inputs_exist_says_what_to_run(tmp_path, tiny_model_dir, tiny_truthfulqa, capsys) -> None:  # type: ignore[no-untyped-def]
    args = run_args(tmp_path / "out", tiny_model_dir, tiny_truthfulqa)
    args[0] = "fit"
    assert main(args) == 2
    assert "hpr-train extract" in capsys.readouterr().err


def test_every_option_is_documented_in_help() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "stage")
    for name, stage_parser in sub.choices.items():  # type: ignore[union-attr]
        for action in stage_parser._actions:
            assert action.help, f"{name} {action.option_strings} has no help"
    assert set(sub.choices) == {"run", "data", "extract", "fit", "select", "eval", "eval-gen"}  # type: ignore[arg-type]


@pytest.mark.skipif(os.environ.get("HPR_SKIP_MODEL_TESTS") == "1", reason="model tests disabled")
@pytest.mark.slow
def test_smollm2_smoke_run_on_eight_questions(tmp_path, truthfulqa_dir) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "smoke"
    code = main(
        [
            "run",
            "--out",
            str(out),
            "--max-questions",
            "8",
            "--data-dir",
            str(truthfulqa_dir),
            "--no-progress",
            "--bootstrap",
            "500",
        ]
    )
    assert code == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["questions"] == 8 and 0.0 <= report["mc2"]["base"] <= 1.0
    adapter = HPRAdapter.load(out / "checkpoint", hidden_size=576, num_layers=30)
    assert len(adapter.config.selected_layers) == 3  # the default top-k


def test_run_on_a_users_pair_file_with_ratio_splits(tmp_path, tiny_model_dir, capsys) -> None:  # type: ignore[no-untyped-def]
    lines = [
        {"question": f"Question number {i}?", "positive": f"Yes, {i} is fine.", "negative": f"Never {i} at all!"}
        for i in range(10)
    ]
    file = tmp_path / "pairs.jsonl"
    file.write_text("\n".join(json.dumps(x) for x in lines))
    args = [
        "run",
        "--out",
        str(tmp_path / "out"),
        "--model",
        str(tiny_model_dir),
        "--pairs-file",
        str(file),
        "--split-ratios",
        "0.6,0.2,0.2",
        "--format",
        "chat",
        "--no-progress",
        "--epochs",
        "1",
        "--top-k",
        "1",
    ]
    assert main(args) == 0
    assert "eval skipped" in capsys.readouterr().out
    adapter = HPRAdapter.load(tmp_path / "out" / "checkpoint")
    assert len(adapter.config.selected_layers) == 1


def test_eval_takes_alpha_and_scope_from_the_checkpoint_unless_flags_override(  # type: ignore[no-untyped-def]
    tmp_path, tiny_model_dir, tiny_truthfulqa
) -> None:
    out = tmp_path / "run"
    flags = ("--format", "chat", "--alpha", "1.5", "--scope", "generated", "--edit-tokens", "2")
    assert main(run_args(out, tiny_model_dir, tiny_truthfulqa, *flags)) == 0
    adapter = HPRAdapter.load(out / "checkpoint")
    assert (adapter.config.default_alpha, adapter.config.default_scope) == (1.5, "generated")
    assert adapter.config.default_edit_tokens == 2
    report = json.loads((out / "eval.json").read_text())
    assert (report["edit"]["alpha"], report["edit"]["scope"], report["edit"]["edit_tokens"]) == (1.5, "generated", 2)
    limited = report["mc2"]["edited"]
    plain = [a for a in run_args(out, tiny_model_dir, tiny_truthfulqa, "--format", "chat")]
    plain[0] = "eval"  # a plain eval after select: the checkpoint's settings, not a flag's default
    assert main(plain) == 0
    assert json.loads((out / "eval.json").read_text())["edit"]["alpha"] == 1.5
    assert main([*plain, "--alpha", "0.5", "--scope", "all", "--edit-tokens", "all"]) == 0
    edit = json.loads((out / "eval.json").read_text())["edit"]
    assert (edit["alpha"], edit["scope"], edit["edit_tokens"]) == (0.5, "all", "all")
    assert main([*plain, "--edit-tokens", "all"]) == 0  # the limit is scored: without it the scores differ
    assert json.loads((out / "eval.json").read_text())["mc2"]["edited"] != pytest.approx(limited, abs=1e-6)


def test_pick_best_writes_what_it_picked_into_the_checkpoint(tmp_path, tiny_model_dir, tiny_truthfulqa) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "run"
    extra = ("--format", "chat", "--sweep-k", "1,3", "--sweep-alpha", "0.5,3", "--pick-best")
    assert main(run_args(out, tiny_model_dir, tiny_truthfulqa, *extra)) == 0
    report = json.loads((out / "eval.json").read_text())
    best = report["sweep"]["best"]
    adapter = HPRAdapter.load(out / "checkpoint")
    assert len(adapter.config.selected_layers) == best["top_k"]
    assert adapter.config.default_alpha == best["alpha"] == report["edit"]["alpha"]
    assert adapter.config.selected_layers == report["edit"]["layers"]
    assert "pick-best" in adapter.config.training["selection"]["picked_by"]


def test_csv_answers_keep_the_standard_mc2(tmp_path, tiny_model_dir, tiny_truthfulqa, truthfulqa_dir) -> None:  # type: ignore[no-untyped-def]
    from trainer.data import load_truthfulqa, load_truthfulqa_csv
    from trainer.run_config import RunConfig, load_dataset

    (tiny_truthfulqa / "TruthfulQA.csv").write_bytes((truthfulqa_dir / "TruthfulQA.csv").read_bytes())
    ds = load_dataset(RunConfig(out=tmp_path, data_dir=tiny_truthfulqa, answers="csv"))
    mc = load_truthfulqa(tiny_truthfulqa)
    csv_answers = load_truthfulqa_csv(tiny_truthfulqa, mc)
    for q in ds.mc_splits["test"]:
        assert q.correct == mc[q.index].correct  # scored: the standard mc2 targets
    for q in ds.splits["train"]:
        assert q.correct == csv_answers[q.index].correct != mc[q.index].correct  # trained: the CSV's answers


@pytest.mark.parametrize("bad", ["0", "-2", "some", "1.5"])
def test_a_bad_edit_tokens_flag_is_refused(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["select", "--out", "x", "--edit-tokens", bad])
    assert "--edit-tokens" in capsys.readouterr().err


def test_the_eval_sweep_scores_the_edit_tokens_limit_too(tmp_path, tiny_model_dir, tiny_truthfulqa) -> None:  # type: ignore[no-untyped-def]
    """--pick-best must choose under the edit that is served: the sweep mirrors --edit-tokens as the test split."""
    sweeps = {}
    for tokens in ("2", "all"):
        out = tmp_path / tokens
        extra = ("--format", "chat", "--sweep-alpha", "3", "--edit-tokens", tokens)
        assert main(run_args(out, tiny_model_dir, tiny_truthfulqa, *extra)) == 0
        sweeps[tokens] = json.loads((out / "eval.json").read_text())["sweep"]["results"]
    assert [r["edit_tokens"] for r in sweeps["2"]] == [2] and [r["edit_tokens"] for r in sweeps["all"]] == ["all"]
    assert sweeps["2"][0]["mc2"]["edited"] != pytest.approx(sweeps["all"][0]["mc2"]["edited"], rel=1e-3)
