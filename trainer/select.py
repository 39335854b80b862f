"""Choosing the layers to edit by eval-split probe accuracy, and plotting that accuracy by layer."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from trainer.errors import TrainerError


def select_layers(accuracy: Mapping[int, float], top_k: int | None = 5, threshold: float | None = None) -> list[int]:
    """The ``top_k`` layers by accuracy (ties: the lower layer), or with ``threshold``: every layer at or above it
    (capped to ``top_k`` if both are given). Returned sorted by layer index."""
    if not accuracy:
        raise TrainerError("no probe accuracies to select layers from")
    if top_k is not None and top_k < 1:
        raise TrainerError(f"top-k must be ≥ 1, got {top_k}")
    ranked = sorted(accuracy, key=lambda layer: (-accuracy[layer], layer))
    if threshold is not None:
        ranked = [layer for layer in ranked if accuracy[layer] >= threshold]
        if not ranked:
            best = max(accuracy.values())
            raise TrainerError(f"no layer reaches probe accuracy {threshold} (best: {best:.3f}); lower --min-accuracy")
    if top_k is not None:
        ranked = ranked[:top_k]
    return sorted(ranked)


def plot_probe_accuracy(
    accuracy: Mapping[int, float], selected: Sequence[int], path: str | os.PathLike[str], title: str = ""
) -> Path:
    """Bar chart of eval probe accuracy per layer (selected layers highlighted), saved as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(accuracy)
    chosen = set(selected)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(layers) + 2), 3.6), dpi=110)
    colors = ["tab:orange" if layer in chosen else "tab:blue" for layer in layers]
    ax.bar(layers, [accuracy[layer] for layer in layers], color=colors)
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    low = min(0.45, min(accuracy.values()) - 0.02)
    ax.set_ylim(low, min(1.0, max(accuracy.values()) + 0.05))
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("eval probe accuracy")
    ax.set_title(title or "HPR probe accuracy by layer (orange: selected)")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
