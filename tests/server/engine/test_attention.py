"""The masks each layer type gets (server.engine.attention), and the layouts read from configs."""

from __future__ import annotations

import pytest
import torch

from server.engine.attention import AttentionLayout, UnsupportedAttentionError
from tests.families import FAMILIES, WINDOW, WINDOWED, make_family_model


def test_a_window_keeps_the_last_keys_of_each_query_and_the_padding_hidden() -> None:
    layout = AttentionLayout(window=2)
    # one row padded by 1 column: 2 new queries (columns 3, 4) over 5 columns
    padded = torch.tensor([[0, 1, 1, 1, 1], [0, 1, 1, 1, 1]], dtype=torch.bool)[None, None]  # (1, 1, 2, 5)
    padded = padded & torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)  # causal
    masks = layout.masks(padded, queries=2, keys=5, rows=1, device=torch.device("cpu"))
    assert isinstance(masks, torch.Tensor)
    assert masks[0, 0].int().tolist() == [[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]
    # nobody padded (None): plain causal, then the window
    plain = layout.masks(None, queries=3, keys=4, rows=2, device=torch.device("cpu"))
    assert isinstance(plain, torch.Tensor) and plain.shape == (2, 1, 3, 4)
    assert plain[1, 0].int().tolist() == [[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]


def test_alternating_layers_get_one_mask_per_layer_type() -> None:
    masks = AttentionLayout(window=1, by_layer_type=True).masks(None, 2, 2, 1, torch.device("cpu"))
    assert isinstance(masks, dict)
    assert masks["full_attention"][0, 0].int().tolist() == [[1, 0], [1, 1]]
    assert masks["sliding_attention"][0, 0].int().tolist() == [[1, 0], [0, 1]]


def test_full_attention_passes_the_mask_through() -> None:
    mask = torch.ones(1, 1, 1, 3, dtype=torch.bool)
    assert AttentionLayout().masks(mask, 1, 3, 1, torch.device("cpu")) is mask
    assert AttentionLayout().masks(None, 1, 3, 1, torch.device("cpu")) is None


@pytest.mark.parametrize("family", FAMILIES)
def test_layouts_read_from_each_family(family: str) -> None:
    layout = AttentionLayout.of(make_family_model(family).model)
    if family in ("gemma2", "gemma3_text"):  # always windowed (1024 here), layers alternating
        assert layout == AttentionLayout(window=1024, by_layer_type=True)
    else:
        assert layout == AttentionLayout()
    if family in WINDOWED:
        windowed = AttentionLayout.of(make_family_model(family, WINDOW).model)
        assert windowed == AttentionLayout(window=WINDOW, by_layer_type=family != "mistral")


def test_attention_the_engine_cannot_mask_is_refused_by_name() -> None:
    model = make_family_model("gemma3_text").model
    model.config.use_bidirectional_attention = True
    with pytest.raises(UnsupportedAttentionError, match="'gemma3_text' has use_bidirectional_attention"):
        AttentionLayout.of(model)
    model = make_family_model("qwen2").model
    model.config.layer_types = ["full_attention", "chunked_attention", "full_attention", "full_attention"]
    with pytest.raises(UnsupportedAttentionError, match=r"'qwen2': config.layer_types has \['chunked_attention'\]"):
        AttentionLayout.of(model)
