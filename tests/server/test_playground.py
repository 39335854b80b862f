"""``GET /playground`` over HTTP: its static files, their size, no external references, and the off switch.

The page itself is driven in a real browser in ``test_playground_browser.py``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from server.app import create_app
from server.cli import parse_settings
from server.playground import STATIC_DIR

# the page, then every other file in server/static/ (the CSS and the ES modules the page imports)
ASSETS = ["/playground", *(f"/playground/{f.name}" for f in sorted(STATIC_DIR.iterdir()) if f.suffix != ".html")]
TYPES = {".css": "text/css", ".js": "text/javascript"}  # a module served as anything else is refused by the browser
MAX_PAGE_BYTES = 150 * 1024


def client(settings: Any) -> TestClient:
    return TestClient(create_app(settings))  # no `with`: no lifespan, no model: the page needs none


def test_playground_serves_every_static_file(tiny_settings: Any) -> None:
    http = client(tiny_settings)
    types = {}
    total = 0
    for path in ASSETS:
        response = http.get(path)
        assert response.status_code == 200, path
        assert "default-src 'self'" in response.headers["content-security-policy"]
        types[path] = response.headers["content-type"].split(";")[0]
        total += len(response.content)
    assert types == {ASSETS[0]: "text/html"} | {path: TYPES[Path(path).suffix] for path in ASSETS[1:]}
    assert "/playground/playground.js" in ASSETS
    assert total <= MAX_PAGE_BYTES


def test_playground_serves_nothing_else(tiny_settings: Any) -> None:
    http = client(tiny_settings)
    for path in ["/playground/app.py", "/playground/..%2Fapp.py", "/playground/playground.html.bak"]:
        response = http.get(path)
        assert response.status_code == 404, path
        assert response.json()["error"]["type"] == "not_found_error"


def test_playground_references_no_external_resource() -> None:
    for file in STATIC_DIR.iterdir():
        text = file.read_text()
        # every src/href/url()/import names a path on this server (or a data: URL); modules import their siblings
        for ref in re.findall(r"""(?:src|href)=["']([^"']+)|url\(([^)]+)\)|from\s+["']([^"']+)""", text):
            target = next(part for part in ref if part)
            assert target.startswith(("/", "./", "data:", "#")), (file.name, target)
            if target.startswith("./"):
                assert (STATIC_DIR / target[2:]).is_file(), (file.name, target)
        assert "//cdn" not in text and "googleapis" not in text, file.name


def test_no_playground_turns_it_off(tiny_settings: Any) -> None:
    assert parse_settings([]).playground is True
    assert parse_settings(["--no-playground"]).playground is False
    http = client(tiny_settings.model_copy(update={"playground": False}))
    for path in ASSETS:
        assert http.get(path).status_code == 404, path


def test_playground_env_switch(monkeypatch: Any) -> None:
    monkeypatch.setenv("HPR_PLAYGROUND", "false")
    assert parse_settings([]).playground is False
    assert parse_settings(["--playground"]).playground is True
