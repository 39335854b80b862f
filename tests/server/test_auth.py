"""API keys: Bearer token on /v1/*, constant-time checked; /health and /metrics stay open."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from server.auth import key_matches
from server.settings import ServerSettings
from tests.server.fake_engine import FakeEngine
from tests.server.live_server import run_server
from tests.server.test_errors import assert_envelope


@pytest.fixture(scope="module")
def keyed_server(tiny_settings: ServerSettings, tmp_path_factory: pytest.TempPathFactory) -> Any:
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text("# team keys\nsk-from-file\n\n")
    settings = tiny_settings.model_copy(update={"api_key": ["sk-right"], "api_key_file": key_file})
    with run_server(settings, FakeEngine) as live:
        yield live


def test_missing_key_is_401(keyed_server: Any) -> None:
    response = httpx.get(keyed_server.api_base + "/models")
    assert_envelope(response, 401, code="invalid_api_key")
    assert response.headers["www-authenticate"] == "Bearer"


def test_wrong_key_is_401_even_before_the_body_is_parsed(keyed_server: Any) -> None:
    headers = {"Authorization": "Bearer sk-wrong", "content-type": "application/json"}
    response = httpx.post(keyed_server.api_base + "/chat/completions", content=b"{not json", headers=headers)
    assert_envelope(response, 401)
    assert_envelope(httpx.get(keyed_server.api_base + "/models", headers={"Authorization": "Basic sk-right"}), 401)


@pytest.mark.parametrize("key", ["sk-right", "sk-from-file"])
def test_right_key_works_with_the_sdk(keyed_server: Any, key: str) -> None:
    client = openai.OpenAI(base_url=keyed_server.api_base, api_key=key, max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny-llama", "tiny"]


def test_sdk_with_a_wrong_key_raises_authentication_error(keyed_server: Any) -> None:
    client = openai.OpenAI(base_url=keyed_server.api_base, api_key="sk-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_health_and_metrics_stay_open(keyed_server: Any) -> None:
    assert httpx.get(keyed_server.base_url + "/health").status_code == 200
    assert httpx.get(keyed_server.base_url + "/metrics").status_code == 200


def test_key_matches() -> None:
    keys = frozenset({"a1", "b2"})
    assert key_matches("b2", keys) and not key_matches("b", keys) and not key_matches("", keys)
    assert not key_matches("é", keys)


def test_unreadable_key_file_fails_at_startup(tmp_path: Path) -> None:
    settings = ServerSettings(api_key_file=tmp_path / "missing.txt")
    with pytest.raises(ValueError, match=r"missing\.txt"):
        settings.api_keys()
