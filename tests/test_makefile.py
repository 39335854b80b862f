"""The README's commands: every ``hpr-train`` / ``hpr-serve`` line that ``make serve`` and ``make eval`` run parses
with today's command-line flags (``make -n`` prints them without running anything)."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def make_lines(*targets: str) -> list[list[str]]:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = subprocess.run(
        ["make", "-n", "-B", "-o", ".venv/.stamp-runtime", "-o", ".venv/.stamp-dev", *targets],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.replace("\\\n", " ")
    return [shlex.split(line) for line in out.splitlines() if "/hpr-train " in line or "/hpr-serve " in line]


def test_make_serve_and_eval_commands_parse() -> None:
    from server.cli import parse_settings
    from trainer.cli import build_parser

    lines = make_lines("serve", "eval")
    train = [argv[1:] for argv in lines if argv[0].endswith("hpr-train")]
    serve = [argv[1:] for argv in lines if argv[0].endswith("hpr-serve")]
    assert {argv[0] for argv in train} == {"run", "eval", "eval-gen"} and len(serve) == 1
    parser = build_parser()
    parsed = {argv[0]: parser.parse_args(argv) for argv in train}
    run = parsed["run"]
    # What make serve trains records the served default; make eval compares it with the MC optimum.
    assert run.scope in ("all", "generated") and run.alpha is not None and run.edit_tokens and run.skip_eval
    configs = {c.name: c for c in parsed["eval-gen"].config}
    assert set(configs) == {"served", "mc-optimal"} and parsed["eval-gen"].split == "test"
    assert (configs["mc-optimal"].alpha, configs["mc-optimal"].scope, configs["mc-optimal"].tokens) == (
        2.0,
        "all",
        "all",
    )
    assert parsed["eval"].edit_tokens == "all"  # scoring-mode MC at the optimum: every answer token edited
    served = configs["served"]
    assert served.alpha is None and served.scope is None and served.tokens is None  # the checkpoint's defaults
    settings = parse_settings(serve[0])
    assert [a.split("=")[0] for a in settings.adapter] == ["truthfulqa"]
