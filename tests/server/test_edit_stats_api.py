"""``hpr.return_stats`` over HTTP with the real engine: the values, for an adapter whose edit is known in advance.

The adapter (tests/known_adapter.py) edits layer 2 of the tiny llama: its probe marks exactly the tokens whose
coordinate j is negative, and every marked token turns by α·π·σ(b). The expected generation and statistics come
from an independent reference: a plain Hugging Face forward over the whole sequence with the float64 sin-ratio
rotation in a forward hook (no KV cache, no batch, no hpr code). Layer 2's probe reads the block's output before
the edit, which (only layer 2 being edited) is the unedited model's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from server.settings import ServerSettings
from tests.known_adapter import hidden_after, known_angle, make_known_adapter, reference_edit
from tests.server.live_server import run_server

LAYER = 2
ALPHA = 0.5
MAX_TOKENS = 5
PROMPTS = ["Once upon a time", "The cat sat on"]
MARGIN = 1e-4  # counted |x_j| must be at least this: the engine's cached forward differs from the reference by ~1e-6


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="module")
def coordinate(reference: Any) -> int:
    """The coordinate that splits each prompt's layer-2 activations into both signs, is negative at the last token
    of some prompt (so scope "generated" rotates something), with the widest margin."""
    model, tokenizer = reference
    columns = [hidden_after(model, torch.tensor([tokenizer.encode(p)]), LAYER)[0] for p in PROMPTS]  # (T, h) each
    margins = torch.stack([c.abs().min(0).values for c in columns]).min(0).values  # (h,)
    mixed = torch.stack([((c < 0).any(0) & (c >= 0).any(0)) for c in columns]).all(0)  # (h,)
    last_negative = torch.stack([c[-1] < 0 for c in columns]).any(0)  # (h,)
    return int(torch.where(mixed & last_negative, margins, torch.zeros_like(margins)).argmax())


@pytest.fixture(scope="module")
def known_server(tiny_model_dir: Path, coordinate: int, tmp_path_factory: pytest.TempPathFactory) -> Any:
    adapter_dir = make_known_adapter(coordinate=coordinate).save(tmp_path_factory.mktemp("known") / "known")
    settings = ServerSettings(
        model=str(tiny_model_dir), adapter=[f"known={adapter_dir}"], device="cpu", dtype="float32"
    )
    with run_server(settings) as live:
        yield live


def reference_generation(model: Any, prompt: list[int], j: int, first: int) -> list[int]:
    """Greedy tokens with the reference edit on layer 2 from position ``first``, one full forward per token."""
    ids = list(prompt)
    with reference_edit(model, LAYER, j, known_angle(ALPHA), start=first), torch.no_grad():
        for _ in range(MAX_TOKENS):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def expected_stats(model: Any, prompt: list[int], generated: list[int], j: int, first: int) -> tuple[int, int]:
    """(tokens, rotated) over the positions the engine feeds (prompt + all generated but the last) from ``first``."""
    fed = torch.tensor([prompt + generated[:-1]])
    x = hidden_after(model, fed, LAYER)[0, first:, j]  # (n,) the probe's w·x at every edited position
    assert float(x.abs().min()) > MARGIN, "a counted token sits on the hyperplane: pick other prompts"
    return x.numel(), int((x < 0).sum())


@pytest.mark.parametrize("scope", ["all", "generated"])
def test_return_stats_reports_the_known_rotations(
    known_server: Any, reference: Any, coordinate: int, scope: str
) -> None:
    model, tokenizer = reference
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    hpr = {"layers": [LAYER], "alpha": ALPHA, "scope": scope, "return_stats": True}
    body = {"model": "known", "prompt": prompts, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    response = httpx.post(known_server.api_base + "/completions", json={**body, "hpr": hpr}, timeout=60)
    assert response.status_code == 200, response.text
    choices = sorted(response.json()["choices"], key=lambda c: c["index"])
    assert len(choices) == len(prompts)
    totals = [0, 0]
    for prompt, choice in zip(prompts, choices, strict=True):
        first = 0 if scope == "all" else len(prompt) - 1  # "generated": the last prompt token onwards
        generated = reference_generation(model, prompt, coordinate, first)
        assert choice["text"] == tokenizer.decode(generated, skip_special_tokens=True)
        tokens, rotated = expected_stats(model, prompt, generated, coordinate, first)
        totals = [totals[0] + tokens, totals[1] + rotated]
        stats = choice["hpr_stats"]
        assert list(stats) == [str(LAYER)]
        got = stats[str(LAYER)]
        assert (got["tokens"], got["rotated"]) == (tokens, rotated)
        assert got["share_rotated"] == pytest.approx(rotated / tokens, rel=1e-9)
        assert got["mean_angle"] == pytest.approx(known_angle(ALPHA), rel=1e-6)
    assert 0 < totals[1] < totals[0]  # the case says something: some positions rotated, some not
