"""The HTTP layer over ``--backend vllm`` in vLLM's default compiled mode, against the same server on
``--backend hf``: the same models list, texts, statistics, errors and run-time adapters.

vLLM compiles the tiny llama once at startup here (torch.compile with inductor on a CPU): the one test module that
covers the default compilation mode.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.settings import ServerSettings
from tests.conftest import make_random_adapter
from tests.server.live_server import LiveServer, run_server
from tests.server.vllm_backend.conftest import TEST_VLLM_ARGS, require_vllm
from tests.server.vllm_backend.families import HIDDEN, LAYERS, save_family_model

ADMIN = "admin-key"
BODIES: list[dict[str, Any] | None] = [
    None,
    {"adapter": "tiny", "return_stats": True},
    {"adapter": "tiny", "layers": "all", "alpha": 2.0, "scope": "all", "return_stats": True},
    {"adapter": "tiny", "layers": [1, 3], "scope": "generated", "edit_tokens": 2, "return_stats": True},
]
PROMPTS = ["Once upon a time", "The quick brown fox jumps over the lazy dog, and then " * 3]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    require_vllm()
    model = save_family_model(tmp_path_factory.mktemp("llama") / "tiny-llama", "llama")
    root = tmp_path_factory.mktemp("adapters")
    tiny = make_random_adapter(hidden=HIDDEN, layers=LAYERS, seed=0).save(root / "tiny")
    for seed in (3, 4):
        make_random_adapter(hidden=HIDDEN, layers=LAYERS, seed=seed).save(root / f"v{seed}")
    return model, root, tiny


def settings(setup: tuple[Path, Path, Path], backend: str) -> ServerSettings:
    model, root, tiny = setup
    return ServerSettings(
        model=str(model),
        backend=backend,  # type: ignore[arg-type]
        vllm_arg=TEST_VLLM_ARGS if backend == "vllm" else [],
        adapter=[f"tiny={tiny}"],
        adapter_root=root,
        admin_key=ADMIN,
        device="cpu",
        dtype="float32",
    )


@pytest.fixture(scope="module")
def servers(setup: tuple[Path, Path, Path]) -> Iterator[dict[str, LiveServer]]:
    with run_server(settings(setup, "vllm"), timeout=900) as vllm, run_server(settings(setup, "hf")) as hf:
        yield {"vllm": vllm, "hf": hf}


def completion(live: LiveServer, hpr: dict[str, Any] | None, prompt: str, model: str | None = None) -> httpx.Response:
    body: dict[str, Any] = {
        "model": model or "tiny-llama",
        "prompt": prompt,
        "max_tokens": 8,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": 1,
    }
    if hpr is not None:
        body["hpr"] = hpr
    return httpx.post(live.api_base + "/completions", json=body, timeout=120)


def test_models_list_the_same_base_and_adapters(servers: dict[str, LiveServer]) -> None:
    listed = {
        name: sorted((m["id"], m.get("parent")) for m in httpx.get(s.api_base + "/models").json()["data"])
        for name, s in servers.items()
    }
    assert listed["vllm"] == listed["hf"] == [("tiny", "tiny-llama"), ("tiny-llama", None)]


def test_completions_and_statistics_equal_the_hf_backend(servers: dict[str, LiveServer]) -> None:
    cases = [(hpr, prompt) for hpr in BODIES for prompt in PROMPTS]

    async def all_at_once() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=servers["vllm"].api_base, timeout=120) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        "/completions",
                        json={"prompt": p, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "logprobs": 1}
                        | ({"hpr": h} if h else {}),
                    )
                    for h, p in cases
                )
            )

    batched = asyncio.run(all_at_once())
    for (hpr, prompt), got in zip(cases, batched, strict=True):
        ref = completion(servers["hf"], hpr, prompt)
        assert got.status_code == ref.status_code == 200, got.text
        mine, theirs = got.json()["choices"][0], ref.json()["choices"][0]
        assert mine["text"] == theirs["text"], (hpr, prompt)
        assert got.json()["usage"] == ref.json()["usage"]
        if hpr is not None:
            assert got.json()["hpr"] == ref.json()["hpr"]  # the echoed edit
            a, b = mine["hpr_stats"], theirs["hpr_stats"]
            assert a.keys() == b.keys() and a
            for layer in a:
                assert (a[layer]["tokens"], a[layer]["rotated"]) == (b[layer]["tokens"], b[layer]["rotated"])
                assert a[layer]["mean_angle"] == pytest.approx(b[layer]["mean_angle"], rel=1e-3, abs=1e-4)
    # The edit shows: alpha 2 on every layer and position moves every prompt's logprobs.
    for base, edited in zip(batched[: len(PROMPTS)], batched[2 * len(PROMPTS) : 3 * len(PROMPTS)], strict=True):
        lp = [r.json()["choices"][0]["logprobs"]["token_logprobs"] for r in (base, edited)]
        assert lp[0] != lp[1]


def test_an_adapter_reloaded_under_its_name_edits_with_its_new_weights(servers: dict[str, LiveServer]) -> None:
    admin = {"Authorization": f"Bearer {ADMIN}"}
    texts: dict[str, list[str]] = {"vllm": [], "hf": []}
    logprobs: dict[str, list[list[float]]] = {"vllm": [], "hf": []}
    for name, live in servers.items():
        for version in ("v3", "v4"):
            loaded = httpx.post(
                live.api_base + "/adapters", json={"name": "rt", "path": version}, headers=admin, timeout=60
            )
            assert loaded.status_code == 200, loaded.text
            r = completion(live, {"adapter": "rt", "layers": "all", "alpha": 1.0, "scope": "all"}, PROMPTS[0])
            assert r.status_code == 200, r.text
            texts[name].append(r.json()["choices"][0]["text"])
            logprobs[name].append(r.json()["choices"][0]["logprobs"]["token_logprobs"])
            assert httpx.delete(live.api_base + "/adapters/rt", headers=admin, timeout=60).status_code == 200
    assert texts["vllm"] == texts["hf"]
    for mine, theirs in zip(logprobs["vllm"], logprobs["hf"], strict=True):
        assert mine == pytest.approx(theirs, abs=2e-3)
    assert logprobs["vllm"][0] != pytest.approx(logprobs["vllm"][1], abs=1e-2)  # v4 is not served with v3's weights
    # The workers drop an unloaded adapter's copy the next time one is sent to them.
    live = servers["vllm"]
    assert httpx.post(live.api_base + "/adapters", json={"name": "rt2", "path": "v3"}, headers=admin).status_code == 200
    assert completion(live, {"adapter": "rt2"}, PROMPTS[0]).status_code == 200
    assert "rt2" in live.engine._worker_keys and "rt" not in live.engine._worker_keys
    assert httpx.delete(live.api_base + "/adapters/rt2", headers=admin, timeout=60).status_code == 200


@pytest.mark.parametrize(
    ("hpr", "status", "param"),
    [({"adapter": "nope"}, 404, "hpr.adapter"), ({"adapter": "tiny", "layers": [7]}, 400, "hpr.layers")],
)
def test_a_bad_edit_is_the_same_error_on_both_backends(
    servers: dict[str, LiveServer], hpr: dict[str, Any], status: int, param: str
) -> None:
    errors = [completion(live, hpr, "Hi") for live in servers.values()]
    assert [e.status_code for e in errors] == [status, status]
    assert errors[0].json() == errors[1].json()
    assert errors[0].json()["error"]["param"] == param


LETTERS = {"type": "object", "properties": {"word": {"enum": ["alpha", "beta", "gamma"]},
           "count": {"type": "integer", "minimum": 0, "maximum": 99}, "tag": {"type": "string", "maxLength": 6}},
           "required": ["word", "count", "tag"], "additionalProperties": False}  # fmt: skip
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {
    "key": {"type": "string", "maxLength": 8}}, "required": ["key"], "additionalProperties": False}}}  # fmt: skip


def test_structured_output_and_tool_calls_equal_the_hf_backend(servers: dict[str, LiveServer]) -> None:
    """Issue 30: the same grammar on both backends (vLLM's guidance backend gets the schema the hf engine builds its
    grammar from), so the greedy constrained texts are equal, edited or not, and valid; rows with and without a
    grammar share a batch."""
    import jsonschema

    schema_format = {"type": "json_schema", "json_schema": {"name": "letters", "schema": LETTERS, "strict": True}}
    bodies: list[dict[str, Any]] = [
        {"prompt": PROMPTS[0], "response_format": schema_format},
        {"prompt": PROMPTS[1], "response_format": schema_format, "hpr": BODIES[2]},
        {"prompt": PROMPTS[0], "response_format": {"type": "json_object"}, "max_tokens": 40},
        {"prompt": PROMPTS[1]},  # free text beside them
    ]

    async def run_all(live: LiveServer) -> list[dict[str, Any]]:
        async with httpx.AsyncClient(timeout=300) as client:
            replies = await asyncio.gather(*(
                client.post(live.api_base + "/completions",
                            json={"model": "tiny-llama", "max_tokens": 60, "temperature": 0, **b})
                for b in bodies
            ))  # fmt: skip
        return [r.json() for r in replies]

    texts = {name: [r["choices"][0]["text"] for r in asyncio.run(run_all(live))] for name, live in servers.items()}
    assert texts["vllm"] == texts["hf"]
    for text in texts["vllm"][:2]:
        jsonschema.validate(__import__("json").loads(text), LETTERS)
    chat = {"model": "tiny-llama", "messages": [{"role": "user", "content": "key?"}], "tools": [TOOL],
            "tool_choice": "required", "max_tokens": 120, "temperature": 0}  # fmt: skip
    calls = {
        name: httpx.post(live.api_base + "/chat/completions", json=chat, timeout=300).json()["choices"][0]
        for name, live in servers.items()
    }
    assert calls["vllm"] == {
        **calls["hf"],
        "message": {
            **calls["hf"]["message"],
            "tool_calls": [
                {**calls["hf"]["message"]["tool_calls"][0], "id": calls["vllm"]["message"]["tool_calls"][0]["id"]}
            ],
        },
    }
    assert calls["vllm"]["finish_reason"] == "tool_calls"
