"""docker/entrypoint.sh: what the container runs for each way of calling it, and which adapters it finds."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

ENTRYPOINT = REPO_ROOT / "docker" / "entrypoint.sh"
# Stands in for hpr-serve / hpr-train: prints the argv it was started with as JSON.
FAKE = '#!/bin/sh\npython3 -c \'import json, sys; print(json.dumps(sys.argv[1:]))\' "$(basename "$0")" "$@"\n'


@pytest.fixture
def run(tmp_path: Path):  # type: ignore[no-untyped-def]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("hpr-serve", "hpr-train"):
        (bin_dir / name).write_text(FAKE)
        (bin_dir / name).chmod(stat.S_IRWXU)

    def run(*args: str, **env: str) -> list[str]:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("HPR_")}
        full_env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", **env)
        out = subprocess.run(["sh", str(ENTRYPOINT), *args], env=full_env, capture_output=True, text=True, check=True)
        argv: list[str] = json.loads(out.stdout)
        return argv

    return run


def checkpoint(directory: Path, config: str = "hpr_config.json") -> Path:
    directory.mkdir(parents=True)
    (directory / config).write_text("{}")
    return directory


def test_no_arguments_serves(run) -> None:  # type: ignore[no-untyped-def]
    assert run(HPR_ADAPTERS_DIR="") == ["hpr-serve"]


def test_flags_alone_go_to_hpr_serve(run) -> None:  # type: ignore[no-untyped-def]
    assert run("--port", "9000", HPR_ADAPTERS_DIR="") == ["hpr-serve", "--port", "9000"]


def test_other_commands_run_as_given(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    checkpoint(tmp_path / "adapters" / "a")
    argv = run("hpr-train", "run", "--out", "/runs/x", HPR_ADAPTERS_DIR=str(tmp_path / "adapters"))
    assert argv == ["hpr-train", "run", "--out", "/runs/x"]


def test_discovers_every_checkpoint_layout_in_every_directory(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ours = checkpoint(tmp_path / "adapters" / "ours")
    seed = checkpoint(tmp_path / "adapters" / "seed", "guidance_config.json")
    (tmp_path / "adapters" / "notes").mkdir()  # no checkpoint inside: skipped
    (tmp_path / "adapters" / "README").write_text("not a directory")
    trained = checkpoint(tmp_path / "runs" / "truthfulqa" / "checkpoint")
    dirs = f"{tmp_path / 'adapters'}:{tmp_path / 'missing'}:{tmp_path / 'runs'}"
    argv = run("--port", "9000", HPR_ADAPTERS_DIR=dirs)
    assert argv == [
        "hpr-serve", "--port", "9000",
        "--adapter", f"ours={ours}", "--adapter", f"seed={seed}", "--adapter", f"truthfulqa={trained}",
    ]  # fmt: skip


@pytest.mark.parametrize("how", ["env", "flag", "flag="])
def test_named_adapters_turn_discovery_off(run, tmp_path: Path, how: str) -> None:  # type: ignore[no-untyped-def]
    checkpoint(tmp_path / "adapters" / "found")
    env = {"HPR_ADAPTERS_DIR": str(tmp_path / "adapters")}
    if how == "env":
        assert run(**env, HPR_ADAPTER="mine=/x") == ["hpr-serve"]
    elif how == "flag":
        assert run("--adapter", "mine=/x", **env) == ["hpr-serve", "--adapter", "mine=/x"]
    else:
        assert run("--adapter=mine=/x", **env) == ["hpr-serve", "--adapter=mine=/x"]
