"""Shared fixtures: a tiny random-weight llama (unit tests) and a random HPR adapter for it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from hpr.checkpoint import HPRAdapter, HPRConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
TRUTHFULQA_DIR = Path(os.environ.get("HPR_TRUTHFULQA_DIR", REPO_ROOT.parent / "shared" / "data" / "truthfulqa"))


def make_tiny_llama(seed: int = 0, hidden: int = 64, layers: int = 4, vocab: int = 128):  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    return model


def make_random_adapter(
    hidden: int = 64, layers: int = 4, seed: int = 0, trained: list[int] | None = None
) -> HPRAdapter:
    torch.manual_seed(seed)
    trained = trained if trained is not None else list(range(layers))
    config = HPRConfig(
        base_model="tiny-llama",
        hidden_size=hidden,
        num_layers=layers,
        layers=trained,
        selected_layers=trained[:2],
        probe_accuracy={layer: 0.5 + 0.1 * i for i, layer in enumerate(trained)},
    )
    adapter = HPRAdapter(config, name="tiny")
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.5)
    return adapter.eval().requires_grad_(False)


def make_steering_adapter(
    hidden: int = 64, layers: int = 4, seed: int = 0, trained: list[int] | None = None
) -> HPRAdapter:
    """A random additive steering-vector adapter (method ``steer``) for the tiny llama."""
    torch.manual_seed(seed)
    trained = trained if trained is not None else list(range(layers))
    config = HPRConfig(
        base_model="tiny-llama",
        hidden_size=hidden,
        num_layers=layers,
        layers=trained,
        selected_layers=trained[:2],
        probe_accuracy={layer: 0.6 for layer in trained},
        method="steer",
    )
    adapter = HPRAdapter(config, name="steer")
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.5)
    return adapter.eval().requires_grad_(False)


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
