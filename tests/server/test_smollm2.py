"""hpr-serve with the embedded SmolLM2-135M-Instruct over real HTTP and the openai SDK (skipped if not set up)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from hpr.errors import ModelLoadError
from hpr.model import EMBEDDED_MODEL_ID, embedded_gguf_path
from server.settings import ServerSettings
from tests.conftest import make_random_adapter
from tests.server.engine.conftest import StepSizes
from tests.server.live_server import run_server

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ADMIN_KEY = "smol-admin"


@pytest.fixture(scope="module")
def smol_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    try:
        embedded_gguf_path()
    except ModelLoadError as exc:
        pytest.skip(str(exc))
    adapter = make_random_adapter(hidden=576, layers=30, trained=[10, 12, 14, 16, 18])
    adapter.config.base_model = EMBEDDED_MODEL_ID
    adapter.config.default_alpha = 2.0  # as the trained checkpoint: requests without an alpha get 2
    with torch.no_grad():  # std 0.5 → 0.05: at 0.5 the angle MLP saturates (θ = α·π exactly: at α 2, no change)
        for p in adapter.parameters():
            p.mul_(0.1)
    adapter_dir: Path = adapter.save(tmp_path_factory.mktemp("smol-adapter") / "truthful")
    settings = ServerSettings(
        adapter=[f"truthful={adapter_dir}"],
        device="cpu",
        dtype="float32",
        max_batch_size=8,
        adapter_root=adapter_dir.parent,
        admin_key=ADMIN_KEY,
    )
    with run_server(settings) as live:
        yield live


def test_models_list_the_base_and_the_adapter(smol_server: Any) -> None:
    data = httpx.get(smol_server.api_base + "/models").json()["data"]
    assert [m["id"] for m in data] == [EMBEDDED_MODEL_ID, "truthful"]
    assert data[1]["parent"] == EMBEDDED_MODEL_ID and data[1]["hpr"]["selected_layers"] == [10, 12]
    assert data[0]["max_model_len"] == 8192


def test_chat_answers_and_streams_the_same_text(smol_server: Any) -> None:
    client = openai.OpenAI(base_url=smol_server.api_base, api_key="x", max_retries=0)
    response = client.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=QUESTION, max_tokens=12, temperature=0)  # type: ignore[arg-type]
    text = response.choices[0].message.content or ""
    assert "Paris" in text
    stream = client.chat.completions.create(
        model=EMBEDDED_MODEL_ID,
        messages=QUESTION,
        max_tokens=12,
        temperature=0,
        stream=True,  # type: ignore[arg-type]
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text


def test_edits_concurrently_equal_alone(smol_server: Any) -> None:
    """At the adapter's default alpha (2): the exactness guarantee of docs/server.md, over HTTP."""
    edits: list[dict[str, Any] | None] = [None, {"layers": "selected"}, {"layers": "all", "alpha": 0.5}]

    def body(edit: dict[str, Any] | None) -> dict[str, Any]:
        b: dict[str, Any] = {"model": "truthful" if edit else EMBEDDED_MODEL_ID, "prompt": "The moon is made of"}
        b.update({"max_tokens": 8, "temperature": 0, "logprobs": 0, "ignore_eos": True})
        return {**b, "hpr": edit} if edit else b

    alone = [httpx.post(smol_server.api_base + "/completions", json=body(e), timeout=120).json() for e in edits]

    async def together() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(timeout=120) as client:
            url = smol_server.api_base + "/completions"
            rs = await asyncio.gather(*(client.post(url, json=body(e)) for e in edits))
        return [r.json() for r in rs]

    engine = smol_server.engine
    recorder = StepSizes(engine.observer)
    engine.observer = recorder
    try:
        batched = asyncio.run(together())
    finally:
        engine.observer = recorder.inner
    assert max(recorder.sizes) == len(edits)  # the three requests shared forward passes
    for a, t in zip(alone, batched, strict=True):
        assert t["choices"][0]["text"] == a["choices"][0]["text"]
        la, lt = a["choices"][0]["logprobs"]["token_logprobs"], t["choices"][0]["logprobs"]["token_logprobs"]
        assert lt == pytest.approx(la, abs=2e-4)  # docs/server.md "Exactness"
    base = alone[0]["choices"][0]["logprobs"]["token_logprobs"]
    for edited in alone[1:]:  # the same prompt unedited: the edits must change something
        assert edited["choices"][0]["logprobs"]["token_logprobs"] != pytest.approx(base, abs=1e-3)
    assert alone[1]["hpr"]["alpha"] == 2.0
    assert alone[2]["hpr"] == {
        "adapter": "truthful",
        "layers": [10, 12, 14, 16, 18],
        "alpha": 0.5,
        "scope": "all",
        "edit_tokens": "all",
    }


def test_scoring_two_answers_through_the_api(smol_server: Any) -> None:
    def score(text: str) -> float:
        body = {"prompt": text, "max_tokens": 0, "echo": True, "logprobs": 0}
        lp = httpx.post(smol_server.api_base + "/completions", json=body, timeout=120).json()["choices"][0]["logprobs"]
        return float(sum(x for x in lp["token_logprobs"][1:]))

    assert score("The capital of France is Paris.") > score("The capital of France is Banana.")


def test_an_adapter_loads_at_run_time_while_a_stream_runs(smol_server: Any) -> None:
    """A checkpoint of the trained TruthfulQA adapter's shape (all 30 layers, HPR) loads through POST /v1/adapters
    while a stream decodes; the stream gets every token, and the new adapter edits. How long the load takes is a
    figure, not a test: bench/adapter_load.py."""
    root = smol_server.app.state.settings.adapter_root
    adapter = make_random_adapter(hidden=576, layers=30)
    adapter.config.base_model = EMBEDDED_MODEL_ID
    adapter.save(root / "full30")
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    body = {"model": "truthful", "prompt": "Tell me a story", "max_tokens": 40, "temperature": 0, "stream": True}
    body["ignore_eos"] = True
    tokens: list[str] = []
    started = threading.Event()

    def consume() -> None:
        with httpx.stream("POST", smol_server.api_base + "/completions", json=body, timeout=300) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    tokens.append(json.loads(line[6:])["choices"][0]["text"])
                    started.set()

    reader = threading.Thread(target=consume)
    reader.start()
    assert started.wait(120)
    start = time.perf_counter()
    response = httpx.post(
        smol_server.api_base + "/adapters", json={"name": "full30", "path": "full30"}, headers=headers, timeout=60
    )
    seconds = time.perf_counter() - start
    assert response.status_code == 200, response.text
    still_running = reader.is_alive()
    used = httpx.post(
        smol_server.api_base + "/completions",
        json={"model": "full30", "prompt": "Hi", "max_tokens": 2, "hpr": {"return_stats": True}},
        timeout=120,
    ).json()
    assert used["hpr"]["adapter"] == "full30" and set(used["choices"][0]["hpr_stats"]) == {"0", "1"}
    deleted = httpx.delete(smol_server.api_base + "/adapters/full30", headers=headers, timeout=60).json()
    assert deleted["deleted"] is True
    reader.join(300)
    print(f"run-time load of a 30-layer HPR adapter on SmolLM2: {seconds:.3f} s (stream running: {still_running})")
    # The load did not wait for the stream, nor the stream for the load: the stream was still running when the load
    # returned, and lost nothing. (How long the load takes is a figure, not a test: printed above.)
    assert still_running and len(tokens) == 40
