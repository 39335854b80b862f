"""Adapters at run time: POST /v1/adapters loads one from under --adapter-root, DELETE /v1/adapters/{name} unloads
it once its running requests finish. Behind the admin key only; off without a root."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hpr.checkpoint import WEIGHTS_NAME
from server.app import create_app
from server.settings import ServerSettings
from tests.conftest import make_random_adapter, make_steering_adapter
from tests.server.fake_engine import FakeEngine
from tests.server.live_server import run_server
from tests.server.test_errors import assert_envelope

ADMIN = "admin-secret"
USER_KEY = "user-key"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}
USER_HEADERS = {"Authorization": f"Bearer {USER_KEY}"}


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """extra (HPR), steer (steering vector), small (wrong hidden size), corrupt (bad weights), and outside/."""
    root = tmp_path_factory.mktemp("adapter-root")
    make_random_adapter(seed=3).save(root / "extra")
    make_steering_adapter(seed=4).save(root / "steer")
    make_random_adapter(hidden=32).save(root / "small")
    make_random_adapter().save(root / "corrupt")
    (root / "corrupt" / WEIGHTS_NAME).write_bytes(b"\x00" * 16)
    outside = tmp_path_factory.mktemp("outside")
    make_random_adapter(seed=5).save(outside / "elsewhere")
    (root / "link").symlink_to(outside / "elsewhere")
    return root


def admin_settings(tiny_settings: ServerSettings, root: Path, **extra: Any) -> ServerSettings:
    return tiny_settings.model_copy(update={"adapter_root": root, "admin_key": ADMIN, "api_key": [USER_KEY], **extra})


@pytest.fixture(scope="module")
def admin_server(tiny_settings: ServerSettings, adapter_root: Path) -> Iterator[Any]:
    with run_server(admin_settings(tiny_settings, adapter_root), FakeEngine) as live:
        yield live


def load(live: Any, name: str, path: str, headers: dict[str, str] = ADMIN_HEADERS) -> httpx.Response:
    return httpx.post(live.api_base + "/adapters", json={"name": name, "path": path}, headers=headers, timeout=30)


def unload(live: Any, name: str) -> httpx.Response:
    return httpx.delete(live.api_base + f"/adapters/{name}", headers=ADMIN_HEADERS, timeout=30)


def chat(live: Any, model: str, **body: Any) -> httpx.Response:
    messages = [{"role": "user", "content": "hi"}]
    payload = {"model": model, "messages": messages, "max_tokens": 3, **body}
    return httpx.post(live.api_base + "/chat/completions", json=payload, headers=USER_HEADERS, timeout=30)


def model_ids(live: Any) -> list[str]:
    return [m["id"] for m in httpx.get(live.api_base + "/models", headers=USER_HEADERS).json()["data"]]


def test_endpoints_are_off_without_a_root(fake_server: Any) -> None:
    assert_envelope(load(fake_server, "x", "x"), 404, code="not_found")
    assert_envelope(unload(fake_server, "tiny"), 404, code="not_found")


def test_a_root_needs_an_admin_key_distinct_from_the_user_keys(tiny_settings: ServerSettings, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--adapter-root needs --admin-key"):
        ServerSettings(**{**tiny_settings.model_dump(), "adapter_root": tmp_path})
    with pytest.raises(ValueError, match="--admin-key must differ"):
        ServerSettings(**{**tiny_settings.model_dump(), "api_key": ["k"], "admin_key": "k"})
    key_file = tmp_path / "keys"
    key_file.write_text("k\n")
    with pytest.raises(ValueError, match="--admin-key must differ"):
        create_app(tiny_settings.model_copy(update={"api_key_file": key_file, "admin_key": "k"}))
    with pytest.raises(ValueError, match="not a directory"):
        ServerSettings(**{**tiny_settings.model_dump(), "adapter_root": tmp_path / "nope", "admin_key": "a"})


def test_only_the_admin_key_opens_the_endpoints(admin_server: Any) -> None:
    for headers in ({}, USER_HEADERS, {"Authorization": "Bearer wrong"}):
        assert_envelope(load(admin_server, "extra", "extra", headers), 401, code="invalid_api_key")
    response = httpx.delete(admin_server.api_base + "/adapters/tiny", headers=USER_HEADERS)
    assert_envelope(response, 401, code="invalid_api_key")
    assert "tiny" in model_ids(admin_server)  # nothing was unloaded
    # and the admin key is no user key
    response = httpx.get(admin_server.api_base + "/models", headers=ADMIN_HEADERS)
    assert_envelope(response, 401, code="invalid_api_key")


def test_load_makes_the_adapter_routable_and_listed(admin_server: Any) -> None:
    response = load(admin_server, "extra", "extra")
    assert response.status_code == 200, response.text
    card = response.json()
    assert card["id"] == "extra" and card["parent"] == "tiny-llama" and card["root"] == "extra"
    assert card["hpr"]["method"] == "hpr" and card["hpr"]["selected_layers"] == [0, 1]
    assert model_ids(admin_server) == ["tiny-llama", "tiny", "extra"]
    body = chat(admin_server, "extra", hpr={"layers": "all"}).json()
    assert body["hpr"]["adapter"] == "extra" and body["hpr"]["layers"] == [0, 1, 2, 3]
    edit = admin_server.engine.requests[-1].edit
    assert (edit.adapter, edit.layers) == ("extra", (0, 1, 2, 3))
    schema = httpx.get(admin_server.base_url + "/openapi.json", headers=USER_HEADERS).json()
    assert "extra" in json.dumps(schema["components"]["schemas"]["ChatCompletionRequest"])  # not a stale schema
    assert_envelope(load(admin_server, "extra", "extra"), 409, param="name", code="adapter_exists")
    assert_envelope(load(admin_server, "tiny-llama", "extra"), 409, param="name", code="adapter_exists")


def test_a_steering_vector_adapter_is_served_like_hpr(admin_server: Any) -> None:
    card = load(admin_server, "steer", str(admin_server.app.state.settings.adapter_root / "steer")).json()
    assert card["hpr"]["method"] == "steer"
    body = chat(admin_server, "steer", hpr={"alpha": 0.5, "return_stats": True}).json()
    assert body["hpr"] == {"adapter": "steer", "layers": [0, 1], "alpha": 0.5, "scope": "all", "edit_tokens": "all"}
    assert set(body["choices"][0]["hpr_stats"]) == {"0", "1"}


@pytest.mark.parametrize(
    ("path", "code", "message"),
    [
        ("../outside", "path_outside_root", "outside the adapter root"),
        ("/etc", "path_outside_root", "outside the adapter root"),
        ("link", "path_outside_root", "outside the adapter root"),  # a symlink out of the root
        ("small", "invalid_checkpoint", "hidden_size=32"),
        ("corrupt", "invalid_checkpoint", "cannot read safetensors"),
        ("missing", "invalid_checkpoint", "does not exist"),
    ],
)
def test_a_bad_path_or_checkpoint_is_a_400_and_the_server_keeps_serving(
    admin_server: Any, path: str, code: str, message: str
) -> None:
    error = assert_envelope(load(admin_server, "bad", path), 400, param="path", code=code)
    assert message in error["message"]
    assert "bad" not in model_ids(admin_server)
    assert httpx.get(admin_server.base_url + "/health").status_code == 200
    assert chat(admin_server, "tiny").status_code == 200


@pytest.mark.parametrize("name", ["", "a/b", "../x", "-x", "x" * 200])
def test_adapter_names_are_checked(admin_server: Any, name: str) -> None:
    assert_envelope(load(admin_server, name, "extra"), 400, param="name")


def test_delete_unloads_and_a_request_naming_it_gets_404(admin_server: Any) -> None:
    assert load(admin_server, "gone", "extra").status_code == 200
    response = unload(admin_server, "gone")
    assert response.status_code == 200
    assert response.json() == {"id": "gone", "object": "model", "deleted": True, "running_requests": 0}
    assert "gone" not in model_ids(admin_server)
    assert_envelope(chat(admin_server, "gone"), 404, param="model", code="model_not_found")
    assert_envelope(chat(admin_server, "tiny-llama", hpr={"adapter": "gone"}), 404, code="adapter_not_found")
    assert_envelope(unload(admin_server, "gone"), 404, param="name", code="adapter_not_found")
    assert load(admin_server, "gone", "extra").status_code == 200  # the name can be loaded again


def test_streams_run_through_a_load_and_an_unload(tiny_settings: ServerSettings, adapter_root: Path) -> None:
    """The real engine: a stream on adapter `tiny` keeps going while `extra` is loaded and used, and while `tiny`
    itself is unloaded; a new request naming `tiny` then gets 404, and `tiny` leaves memory when the stream ends.
    The streamed text equals the same request's text on a server where nothing was loaded or unloaded."""
    settings = admin_settings(tiny_settings, adapter_root, num_threads=1)  # tiny model: threads only wait
    body = {
        "model": "tiny",
        "prompt": "Once upon a time",
        "max_tokens": 200,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    with run_server(settings) as live:
        engine = live.engine
        decode = engine.runner.decode

        def slow_decode(batch: Any) -> Any:  # ~1 s of stream on the tiny model: room for the admin calls
            time.sleep(0.005)
            return decode(batch)

        engine.runner.decode = slow_decode
        started_at = time.perf_counter()
        reference = httpx.post(
            live.api_base + "/completions", json={**body, "stream": False}, headers=USER_HEADERS, timeout=120
        )
        print(f"reference request: {time.perf_counter() - started_at:.2f} s")
        expected = reference.json()["choices"][0]["text"]
        chunks: list[str] = []
        finish: list[str] = []
        started = threading.Event()

        def consume() -> None:
            with httpx.stream(
                "POST", live.api_base + "/completions", json=body, headers=USER_HEADERS, timeout=120
            ) as response:
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        choice = json.loads(line[6:])["choices"][0]
                        chunks.append(choice["text"])
                        if choice["finish_reason"]:
                            finish.append(choice["finish_reason"])
                        started.set()

        reader = threading.Thread(target=consume)
        reader.start()
        assert started.wait(30)
        start = time.perf_counter()
        assert load(live, "extra", "extra").status_code == 200
        load_seconds = time.perf_counter() - start
        assert chat(live, "extra", max_tokens=2).status_code == 200  # joins the running batch
        deleted = unload(live, "tiny").json()
        assert deleted["deleted"] and deleted["running_requests"] == 1  # the stream still runs on it
        assert_envelope(chat(live, "tiny"), 404, code="model_not_found")
        assert live.app.state.runtime.registry.get("tiny") is not None  # kept for the running stream
        reader.join(60)
        assert finish == ["length"] and "".join(chunks) == expected  # uninterrupted, the same text
        assert "tiny" not in live.app.state.runtime.registry.names()
        with pytest.raises(Exception, match="not loaded"):
            live.app.state.runtime.registry.get("tiny")  # gone with its last request
        print(f"run-time adapter load during a stream: {load_seconds:.3f} s")
