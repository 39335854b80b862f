"""Trainer fixtures: a character-level tokenizer (with a chat template) for the tiny random llama, tiny data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import make_tiny_llama
from trainer.data import Question

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_char_tokenizer():  # type: ignore[no-untyped-def]
    """One token per printable ASCII character (ids 3..97), specials 0-2 and two chat markers: < 128 ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    vocab["\n"] = len(vocab)
    vocab["<|im_start|>"] = len(vocab)
    vocab["<|im_end|>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def char_tokenizer():  # type: ignore[no-untyped-def]
    return make_char_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random llama + char tokenizer saved as a Hugging Face directory (loadable by hpr.model)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama().save_pretrained(path)
    make_char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def small_questions() -> list[Question]:
    return [
        Question(0, "What color is the sky?", ("Blue on a clear day.", "It is blue."), ("Green.", "The sky is red.")),
        Question(1, "Can pigs fly?", ("No, pigs cannot fly.",), ("Yes, pigs fly south.", "Pigs fly at night.")),
        Question(2, "Is water wet?", ("Water makes things wet.",), ("Water is dry.", "Never.", "Only on Monday.")),
    ]


@pytest.fixture
def tiny_truthfulqa(tmp_path: Path, truthfulqa_dir: Path) -> Path:
    """A 12-question TruthfulQA directory (first rows of the real files) with a 4/4/4 split."""
    out = tmp_path / "tqa"
    out.mkdir()
    records = json.loads((truthfulqa_dir / "mc_task.json").read_text())[:12]
    (out / "mc_task.json").write_text(json.dumps(records))
    (out / "ids_splits.json").write_text(
        json.dumps({"train": [0, 1, 2, 3], "eval": [4, 5, 6, 7], "test": [8, 9, 10, 11]})
    )
    return out
