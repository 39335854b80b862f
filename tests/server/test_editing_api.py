"""Per-request editing over the API: which edit reaches the engine, and what the response reports."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.server.test_errors import assert_envelope

USER = [{"role": "user", "content": "hi"}]


def chat(live: Any, **body: Any) -> httpx.Response:
    return httpx.post(live.api_base + "/chat/completions", json={"messages": USER, "max_tokens": 3, **body}, timeout=30)


def last_request(live: Any) -> Any:
    return live.engine.requests[-1]


def test_base_model_means_no_edit(fake_server: Any) -> None:
    response = chat(fake_server, model="tiny-llama")
    assert response.status_code == 200
    assert response.json()["hpr"] is None
    assert last_request(fake_server).edit is None


def test_model_omitted_means_the_base_model(fake_server: Any) -> None:
    response = chat(fake_server)
    assert response.status_code == 200 and response.json()["model"] == "tiny-llama"
    assert last_request(fake_server).edit is None


def test_adapter_as_model_edits_its_selected_layers(fake_server: Any) -> None:
    body = chat(fake_server, model="tiny").json()
    assert body["hpr"] == {"adapter": "tiny", "layers": [0, 1], "alpha": 1.0, "scope": "all", "edit_tokens": "all"}
    edit = last_request(fake_server).edit
    assert (edit.adapter, edit.layers, edit.alpha, edit.scope) == ("tiny", (0, 1), 1.0, "all")


@pytest.mark.parametrize(
    ("layers", "expected"),
    [("selected", [0, 1]), ("all", [0, 1, 2, 3]), ("none", []), ([3, 1], [1, 3]), ("1-2,3", [1, 2, 3]), ("2", [2])],
)
def test_layer_specs(fake_server: Any, layers: Any, expected: list[int]) -> None:
    body = chat(fake_server, model="tiny-llama", hpr={"adapter": "tiny", "layers": layers, "alpha": 0.5}).json()
    assert body["hpr"]["layers"] == expected
    assert body["hpr"]["alpha"] == 0.5
    assert list(last_request(fake_server).edit.layers) == expected


def test_hpr_fields_apply_to_the_model_adapter(fake_server: Any) -> None:
    body = chat(fake_server, model="tiny", hpr={"layers": "all", "alpha": 2, "scope": "generated"}).json()
    assert body["hpr"] == {
        "adapter": "tiny",
        "layers": [0, 1, 2, 3],
        "alpha": 2.0,
        "scope": "generated",
        "edit_tokens": "all",
    }


def test_model_and_hpr_adapter_must_agree(fake_server: Any) -> None:
    assert chat(fake_server, model="tiny", hpr={"adapter": "tiny"}).status_code == 200
    response = chat(fake_server, model="tiny", hpr={"adapter": "other"})
    assert_envelope(response, 400, "hpr.adapter", "conflicting_adapter")


def test_hpr_without_any_adapter_is_400(fake_server: Any) -> None:
    assert_envelope(chat(fake_server, hpr={"layers": "all"}), 400, "hpr.adapter")
    assert chat(fake_server, hpr={"layers": "none"}).json()["hpr"] is None


def test_completions_take_the_same_hpr_extension(fake_server: Any) -> None:
    body = {"model": "tiny", "prompt": "abc", "max_tokens": 2, "hpr": {"layers": [3], "alpha": 0}}
    response = httpx.post(fake_server.api_base + "/completions", json=body, timeout=30).json()
    assert response["hpr"] == {"adapter": "tiny", "layers": [3], "alpha": 0.0, "scope": "all", "edit_tokens": "all"}


def test_models_lists_adapters_with_parent_and_layers(fake_server: Any) -> None:
    data = httpx.get(fake_server.api_base + "/models").json()["data"]
    assert [m["id"] for m in data] == ["tiny-llama", "tiny"]
    base, adapter = data
    assert base["parent"] is None and base["max_model_len"] == 256
    assert adapter["parent"] == "tiny-llama"
    assert adapter["hpr"]["trained_layers"] == [0, 1, 2, 3]
    assert adapter["hpr"]["selected_layers"] == [0, 1]
    assert adapter["hpr"]["probe_accuracy"] == {"0": 0.5, "1": 0.6, "2": 0.7, "3": 0.8}


def test_retrieve_one_model(fake_server: Any) -> None:
    import openai

    client = openai.OpenAI(base_url=fake_server.api_base, api_key="x", max_retries=0)
    card = client.models.retrieve("tiny")
    assert card.id == "tiny" and card.model_extra is not None and card.model_extra["parent"] == "tiny-llama"
    assert client.models.retrieve("tiny-llama").id == "tiny-llama"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_adapter_defaults_apply_when_the_request_gives_none(tiny_model_dir: Any, tmp_path: Any) -> None:
    """A checkpoint's default_alpha and default_scope (chosen by the generation-mode eval) are what it serves."""
    from server.settings import ServerSettings
    from tests.conftest import make_random_adapter
    from tests.server.fake_engine import FakeEngine
    from tests.server.live_server import run_server

    adapter = make_random_adapter()
    adapter.config.default_alpha, adapter.config.default_scope = 1.5, "generated"
    adapter.config.default_edit_tokens = 4
    path = adapter.save(tmp_path / "chat")
    settings = ServerSettings(model=str(tiny_model_dir), adapter=[f"chat={path}"], device="cpu", dtype="float32")
    with run_server(settings, FakeEngine) as live:
        assert chat(live, model="chat").json()["hpr"] == {
            "adapter": "chat",
            "layers": [0, 1],
            "alpha": 1.5,
            "scope": "generated",
            "edit_tokens": 4,
        }
        assert last_request(live).edit.tokens == 4
        overridden = chat(live, model="chat", hpr={"alpha": 0.5, "scope": "all", "edit_tokens": "all"}).json()["hpr"]
        assert (overridden["alpha"], overridden["scope"], overridden["edit_tokens"]) == (0.5, "all", "all")
        assert last_request(live).edit.tokens is None
        assert chat(live, model="chat", hpr={"edit_tokens": 9}).json()["hpr"]["edit_tokens"] == 9
        assert last_request(live).edit.tokens == 9
        card = httpx.get(live.api_base + "/models/chat", timeout=30).json()
        assert (card["hpr"]["default_alpha"], card["hpr"]["default_scope"]) == (1.5, "generated")
        assert card["hpr"]["default_edit_tokens"] == 4


@pytest.mark.parametrize("bad", [0, -1, 2.5, "some", True, [3]])
def test_a_bad_edit_tokens_is_a_400_that_names_it(fake_server: Any, bad: Any) -> None:
    error = assert_envelope(chat(fake_server, model="tiny", hpr={"edit_tokens": bad}), 400, "hpr.edit_tokens")
    assert "edit_tokens" in error["message"] or "all" in error["message"]
