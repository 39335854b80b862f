"""Layer selection by eval probe accuracy and its plot."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.errors import TrainerError
from trainer.select import plot_probe_accuracy, select_layers

ACC = {0: 0.55, 1: 0.71, 2: 0.69, 3: 0.71, 4: 0.52, 5: 0.80}


def test_top_k_keeps_the_most_accurate_layers_sorted_by_index() -> None:
    assert select_layers(ACC, top_k=3) == [1, 3, 5]
    assert select_layers(ACC, top_k=2) == [1, 5]  # tie 1 vs 3 goes to the lower layer


def test_threshold_keeps_every_layer_above_it_capped_by_top_k() -> None:
    assert select_layers(ACC, top_k=None, threshold=0.69) == [1, 2, 3, 5]
    assert select_layers(ACC, top_k=2, threshold=0.69) == [1, 5]
    with pytest.raises(TrainerError, match="no layer reaches"):
        select_layers(ACC, top_k=None, threshold=0.9)


def test_plot_is_a_png_next_to_the_checkpoint(tmp_path: Path) -> None:
    path = plot_probe_accuracy(ACC, [1, 5], tmp_path / "ckpt" / "probe_accuracy.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
