"""An adapter's defaults set where it is registered (issue 29 item 7): ``--adapter
NAME=DIR:alpha=2:scope=all:tokens=all`` and ``POST /v1/adapters`` with ``alpha``/``scope``/``edit_tokens``. A client
that sends no ``hpr`` field (an evaluation harness) reaches any edit by its name; the checkpoint's files are not
changed."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hpr.edit_spec import AdapterDefaults
from server.cli import parse_settings
from server.settings import ServerSettings
from tests.server.fake_engine import FakeEngine
from tests.server.live_server import run_server
from tests.server.test_errors import assert_envelope

ADMIN = "admin"


class RecordingEngine(FakeEngine):
    last: Any = None

    def generate(self, request: Any) -> Any:
        RecordingEngine.last = request
        return super().generate(request)


def test_the_adapter_flag_takes_defaults_after_the_path(tmp_path: Path) -> None:
    settings = parse_settings(["--adapter", f"a={tmp_path}/a:alpha=2:scope=all:tokens=all", "--adapter", "b=/x/b",
                               "--adapter", "/y/c:tokens=3"])  # fmt: skip
    assert settings.adapters() == {
        "a": (tmp_path / "a", AdapterDefaults(alpha=2.0, scope="all", tokens="all")),
        "b": (Path("/x/b"), AdapterDefaults()),
        "c": (Path("/y/c"), AdapterDefaults(tokens=3)),
    }


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("a=/x:alpha=two", "alpha 'two' is not a number"),
        ("a=/x:scope=some", "scope must be 'all' or 'generated'"),
        ("a=/x:tokens=0", "tokens must be a whole number ≥ 1 or 'all'"),
        ("a=/x:layers=3", "bad field 'layers=3'"),
        ("a=/x:alpha=1:alpha=2", "bad field 'alpha=2'"),
    ],
)
def test_a_bad_default_is_refused_naming_it(value: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_settings(["--adapter", value])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.fixture(scope="module")
def live(
    tiny_settings: ServerSettings, tiny_adapter_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    root = tmp_path_factory.mktemp("root")
    shutil.copytree(tiny_adapter_dir, root / "tiny")
    settings = tiny_settings.model_copy(
        update={
            "adapter": [f"tiny={tiny_adapter_dir}", f"tiny-all={tiny_adapter_dir}:alpha=2:scope=all:tokens=all"],
            "adapter_root": root,
            "admin_key": ADMIN,
        }
    )
    with run_server(settings, RecordingEngine) as server:
        yield server


def completion(live: Any, model: str) -> Any:
    body = {"model": model, "prompt": "x", "max_tokens": 1}
    assert httpx.post(live.api_base + "/completions", json=body).status_code == 200
    return RecordingEngine.last.edit


def test_one_checkpoint_under_two_names_with_their_own_defaults(live: Any, tiny_adapter_dir: Path) -> None:
    own = json.loads((tiny_adapter_dir / "hpr_config.json").read_text())
    plain, everything = completion(live, "tiny"), completion(live, "tiny-all")
    assert (plain.alpha, plain.scope, plain.tokens) == (own["default_alpha"], own["default_scope"],
                                                         own["default_edit_tokens"])  # fmt: skip
    assert (everything.alpha, everything.scope, everything.tokens) == (2.0, "all", None)
    assert plain.layers == everything.layers  # the same checkpoint's selected layers
    card = httpx.get(live.api_base + "/models/tiny-all").json()["hpr"]
    assert (card["default_alpha"], card["default_scope"]) == (2.0, "all")
    assert json.loads((tiny_adapter_dir / "hpr_config.json").read_text()) == own  # the files are untouched


def test_post_adapters_takes_the_same_defaults(live: Any) -> None:
    headers = {"Authorization": f"Bearer {ADMIN}"}
    body = {"name": "tiny-gen", "path": "tiny", "alpha": 0.5, "scope": "generated", "edit_tokens": 2}
    assert httpx.post(live.api_base + "/adapters", json=body, headers=headers).status_code == 200
    edit = completion(live, "tiny-gen")
    assert (edit.alpha, edit.scope, edit.tokens) == (0.5, "generated", 2)
    bad = httpx.post(live.api_base + "/adapters", json={**body, "name": "x", "alpha": 9}, headers=headers)
    assert assert_envelope(bad, 400)["param"] == "alpha"
    httpx.delete(live.api_base + "/adapters/tiny-gen", headers=headers)
