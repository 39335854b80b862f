"""Fixtures shared by the server tests (HTTP layer and engine): a tiny model directory with a tiny tokenizer.

The tokenizer is character-level (printable ASCII + newline, plus specials) with a ChatML-style chat template, so
prompts, chat templating and detokenization are real but every test runs in well under a second. The model is the
tiny random llama from ``tests/conftest.py`` with ``vocab_size == len(tokenizer)`` and ``<|im_end|>`` as eos.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import make_random_adapter, make_tiny_llama

TINY_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tiny_tokenizer() -> Any:
    """A character-level fast tokenizer: ids 0-5 specials, then ASCII 32-126 and newline (102 tokens)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {token: i for i, token in enumerate(TINY_SPECIALS + chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    # read as literal UTF-8 text, as sentencepiece vocabularies are (llguidance, the grammar library, needs to know)
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    backend.add_special_tokens(TINY_SPECIALS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def save_tiny_model(directory: Path, seed: int = 0, layers: int = 4, hidden: int = 64) -> Path:
    """Write a loadable Hugging Face directory (config, weights, tokenizer) for the tiny llama."""
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_llama(seed=seed, hidden=hidden, layers=layers, vocab=len(tokenizer))
    eos = tokenizer.eos_token_id
    model.config.eos_token_id = eos
    model.generation_config.eos_token_id = eos
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama (4 layers, hidden 64) + tiny tokenizer saved as a model directory (``--model <dir>``)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random HPR adapter for the tiny llama in our format: trained layers 0-3, selected 0-1."""
    return make_random_adapter().save(tmp_path_factory.mktemp("tiny-adapter") / "tiny")


@pytest.fixture(scope="session")
def tiny_settings(tiny_model_dir: Path, tiny_adapter_dir: Path) -> Any:
    """Settings for a server over the tiny model with the adapter ``tiny`` (fp32, CPU)."""
    from server.settings import ServerSettings

    adapters = [f"tiny={tiny_adapter_dir}"]
    return ServerSettings(model=str(tiny_model_dir), adapter=adapters, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def fake_server(tiny_settings: Any) -> Iterator[Any]:
    """A live server (real HTTP) over the tiny model with the scripted :class:`FakeEngine`."""
    from tests.server.fake_engine import FakeEngine
    from tests.server.live_server import run_server

    with run_server(tiny_settings, FakeEngine) as live:
        yield live
