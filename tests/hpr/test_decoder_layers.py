"""Edits attach to any Hugging Face decoder-only architecture, found generically."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from hpr.decoder_layers import find_decoder_layers, hidden_size, num_hidden_layers
from hpr.editing import EditPlan, EditSpec, HPREditor
from tests.conftest import make_random_adapter

COMMON: dict[str, Any] = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def build(kind: str) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    if kind == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**COMMON))
    elif kind == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**COMMON))
    elif kind == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**COMMON))
    elif kind == "gemma":
        model = tf.GemmaForCausalLM(tf.GemmaConfig(**COMMON, head_dim=8))
    elif kind == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=96, n_embd=32, n_layer=3, n_head=4, n_positions=64))
    else:
        raise AssertionError(kind)
    return model.eval().requires_grad_(False)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "gemma", "gpt2"])
def test_edit_attaches_and_detaches(kind: str) -> None:
    model = build(kind)
    assert len(find_decoder_layers(model)) == num_hidden_layers(model) == 3
    assert hidden_size(model) == 32
    ids = torch.randint(0, 96, (2, 6))
    with torch.no_grad():
        base = model(input_ids=ids).logits
    editor = HPREditor(model, {"a": make_random_adapter(hidden=32, layers=3)})
    with torch.no_grad(), editor.apply(EditPlan([EditSpec("a", (0, 1, 2)), None])):
        edited = model(input_ids=ids).logits
    editor.detach()
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert not torch.allclose(edited[0], base[0])
    assert torch.equal(edited[1], base[1])
    assert torch.equal(after, base)
