"""A checkpoint written by the paper's own code, served: ``/v1/models`` and ``selected`` follow its selection.

The checkpoint is ``../shared/fixtures/seed-checkpoint`` (hidden 64, 6 layers, modules on 1, 2, 4, 5, selected
{2: 0.78125, 4: 0.8125}), served read-only in place next to one of ours on a tiny llama of that shape.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import make_random_adapter
from tests.server.conftest import save_tiny_model

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def seed_server(seed_checkpoint_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from server.settings import ServerSettings
    from tests.server.fake_engine import FakeEngine
    from tests.server.live_server import run_server

    root = tmp_path_factory.mktemp("seed-api")
    model_dir = save_tiny_model(root / "tiny-llama-6", layers=6)
    ours = make_random_adapter(layers=6, trained=[1, 2, 4, 5]).save(root / "ours")
    adapters = [f"seed={seed_checkpoint_dir}", f"ours={ours}"]
    settings = ServerSettings(model=str(model_dir), adapter=adapters, device="cpu", dtype="float32")
    with run_server(settings, FakeEngine) as live:
        yield live


def test_models_shows_the_seed_selection_and_probe_accuracy(seed_server: Any) -> None:
    cards = {card["id"]: card for card in httpx.get(seed_server.api_base + "/models").json()["data"]}
    seed = cards["seed"]["hpr"]
    assert seed["format"] == "seed"
    assert seed["base_model"] == "tiny-llama-h64-l6"
    assert seed["trained_layers"] == [1, 2, 4, 5]
    assert seed["selected_layers"] == [2, 4]
    assert seed["probe_accuracy"] == {"2": 0.78125, "4": 0.8125}
    assert set(seed) == set(cards["ours"]["hpr"])  # described like one of ours, field for field


def test_selected_layers_of_a_request_are_the_seeds(seed_server: Any) -> None:
    for hpr in (None, {"layers": "selected"}):
        body = {"model": "seed", "messages": USER, "max_tokens": 2, **({"hpr": hpr} if hpr else {})}
        response = httpx.post(seed_server.api_base + "/chat/completions", json=body, timeout=30)
        assert response.status_code == 200, response.text
        assert response.json()["hpr"]["layers"] == [2, 4]
        assert seed_server.engine.requests[-1].edit.layers == (2, 4)
