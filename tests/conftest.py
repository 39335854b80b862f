"""Shared fixtures: a tiny random-weight llama (unit tests) and random adapters for it (HPR, steering vector)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from hpr.checkpoint import HPRAdapter, HPRConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
TRUTHFULQA_DIR = Path(os.environ.get("HPR_TRUTHFULQA_DIR", REPO_ROOT.parent / "shared" / "data" / "truthfulqa"))


def tiny_config_kwargs(
    vocab: int, eos: int, hidden: int = 64, layers: int = 4, heads: int = 4, max_positions: int = 256
) -> dict[str, Any]:
    """The config fields every tiny test model shares, whatever its family (this llama, ``tests/families.py``):
    MLP width 2h, 2 KV heads, bos 1, pad 0, untied embeddings."""
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 2,
        "max_position_embeddings": max_positions,
        "bos_token_id": 1,
        "eos_token_id": eos,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
    }


def make_tiny_llama(seed: int = 0, hidden: int = 64, layers: int = 4, vocab: int = 128):  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**tiny_config_kwargs(vocab, eos=2, hidden=hidden, layers=layers))
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def _random_adapter(
    method: str,
    name: str,
    accuracy: Callable[[int], float],
    hidden: int,
    layers: int,
    seed: int,
    trained: list[int] | None,
) -> HPRAdapter:
    """An adapter of ``method`` for the tiny llama: modules on ``trained`` (default: every layer), the first two
    selected, probe accuracy ``accuracy(i)`` for the i-th trained layer, N(0, 0.5) weights drawn from ``seed``."""
    torch.manual_seed(seed)
    trained = trained if trained is not None else list(range(layers))
    config = HPRConfig(
        base_model="tiny-llama",
        hidden_size=hidden,
        num_layers=layers,
        layers=trained,
        selected_layers=trained[:2],
        probe_accuracy={layer: accuracy(i) for i, layer in enumerate(trained)},
        method=method,
    )
    adapter = HPRAdapter(config, name=name)
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.5)
    return adapter.eval().requires_grad_(False)


def make_random_adapter(
    hidden: int = 64, layers: int = 4, seed: int = 0, trained: list[int] | None = None
) -> HPRAdapter:
    """A random HPR adapter (``tiny``) for the tiny llama; probe accuracies 0.5, 0.6, ... in layer order."""
    return _random_adapter("hpr", "tiny", lambda i: 0.5 + 0.1 * i, hidden, layers, seed, trained)


def make_steering_adapter(
    hidden: int = 64, layers: int = 4, seed: int = 0, trained: list[int] | None = None
) -> HPRAdapter:
    """A random additive steering-vector adapter (method ``steer``, name ``steer``) for the tiny llama."""
    return _random_adapter("steer", "steer", lambda i: 0.6, hidden, layers, seed, trained)


@pytest.fixture(scope="session")
def tiny_model():  # type: ignore[no-untyped-def]
    return make_tiny_llama()


@pytest.fixture
def tiny_adapter() -> HPRAdapter:
    return make_random_adapter()


def find_truthfulqa(directory: Path | None = None) -> Path | None:
    """``directory`` (default: ``TRUTHFULQA_DIR``) if it holds TruthfulQA's ``mc_task.json``."""
    directory = directory or TRUTHFULQA_DIR
    return directory if (directory / "mc_task.json").is_file() else None


def find_seed_checkpoint() -> Path | None:
    """The checkpoint written by the reference code: ``$HPR_SEED_CHECKPOINT_DIR``, else
    ``../shared/fixtures/seed-checkpoint`` relative to the cwd or to this checkout (as ``default_data_dir`` does)."""
    env = os.environ.get("HPR_SEED_CHECKPOINT_DIR")
    candidates = [Path(env)] if env else []
    candidates += [base / "shared" / "fixtures" / "seed-checkpoint" for base in (Path.cwd().parent, REPO_ROOT.parent)]
    return next((path for path in candidates if (path / "guidance_config.json").is_file()), None)


def require_shared_fixture(found: Path | None, what: str) -> Path:
    """``found``, else skip with a message; under ``CI=true`` a missing fixture fails instead of skipping."""
    if found is not None:
        return found
    message = f"{what} not found"
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"{message}, and CI requires it", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def truthfulqa_dir() -> Path:
    """``../shared/data/truthfulqa`` (or ``$HPR_TRUTHFULQA_DIR``); under ``CI=true`` its absence fails the test."""
    return require_shared_fixture(find_truthfulqa(), f"TruthfulQA ({TRUTHFULQA_DIR} or $HPR_TRUTHFULQA_DIR)")


@pytest.fixture(scope="session")
def seed_checkpoint_dir() -> Path:
    """``../shared/fixtures/seed-checkpoint`` (read-only: tests that alter it copy it to ``tmp_path`` first)."""
    where = REPO_ROOT.parent / "shared" / "fixtures" / "seed-checkpoint"
    return require_shared_fixture(
        find_seed_checkpoint(), f"seed checkpoint fixture ({where} or $HPR_SEED_CHECKPOINT_DIR)"
    )
