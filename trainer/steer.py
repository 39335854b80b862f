"""Fitting an additive steering vector per layer: the mean positive minus the mean negative activation.

v_l = mean over the train split's aligned (positive, negative) token positions of x_pos − x_neg, at the output of
decoder layer l (the same positions HPR trains on, from the same activation store). Served as x' = x + α·v_l
(``hpr.steering.SteeringVector``). Each layer's "probe accuracy" is that of the classifier the vector implies —
positive iff (x − m_l)·v_l > 0, m_l the midpoint of the two train means — on the eval split's aligned tokens,
both of each pair counted as HPR's probe accuracy counts them; layers are selected on it the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from hpr.checkpoint import HPRAdapter, HPRConfig
from trainer.pairs import PairSet


@dataclass
class SteeringFit:
    vectors: Tensor  # (L, h) float32: mean positive − mean negative, per layer
    midpoints: Tensor  # (L, h) float32: (mean positive + mean negative) / 2
    eval_accuracy: dict[int, float]
    seconds: float

    def to_adapter(self, config: HPRConfig) -> HPRAdapter:
        """A ``steer`` adapter with the vectors of ``config.layers``."""
        adapter = HPRAdapter(config, name="steer")
        for layer in config.layers:
            adapter.layer(layer).load_state_dict({"vector": self.vectors[layer].clone()})
        return adapter.eval().requires_grad_(False)


def _means(data: PairSet, batch_tokens: int) -> tuple[Tensor, Tensor]:
    """(L, h) float64 means of the aligned positive and of the aligned negative tokens."""
    pos = torch.zeros(data.num_layers, data.hidden_size, dtype=torch.float64)
    neg = torch.zeros_like(pos)
    count = 0
    for steps in data.token_batches(batch_tokens):
        pos += data.activations[data.pos_rows[steps]].double().sum(0)  # (L, h)
        neg += data.activations[data.neg_rows[steps]].double().sum(0)
        count += steps.shape[0]
    return pos / max(count, 1), neg / max(count, 1)


@torch.no_grad()
def direction_accuracy(data: PairSet, vectors: Tensor, midpoints: Tensor, batch_tokens: int = 4096) -> Tensor:
    """(L,) share of aligned positive tokens with (x − m)·v > 0 and negative ones with ≤ 0 (both counted)."""
    v, m = vectors.double(), midpoints.double()
    offset = (m * v).sum(-1)  # (L,)
    correct = torch.zeros(data.num_layers, dtype=torch.float64)
    total = 0
    for steps in data.token_batches(batch_tokens):
        for rows, positive in ((data.pos_rows[steps], True), (data.neg_rows[steps], False)):
            score = torch.einsum("nlh,lh->ln", data.activations[rows].double(), v) - offset[:, None]  # (L, n)
            correct += (score > 0).sum(1).double() if positive else (score <= 0).sum(1).double()
        total += 2 * steps.shape[0]
    return (correct / max(total, 1)).float()


def fit_steering(train: PairSet, evaluation: PairSet, batch_tokens: int = 4096) -> SteeringFit:
    """One steering vector per layer of ``train``, with its direction's accuracy on ``evaluation``."""
    start = time.perf_counter()
    pos, neg = _means(train, batch_tokens)
    vectors, midpoints = (pos - neg).float(), ((pos + neg) / 2).float()
    accuracy = direction_accuracy(evaluation, vectors, midpoints, batch_tokens)
    return SteeringFit(
        vectors=vectors,
        midpoints=midpoints,
        eval_accuracy={layer: float(accuracy[layer]) for layer in range(train.num_layers)},
        seconds=time.perf_counter() - start,
    )
