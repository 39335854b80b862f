"""Token-level training pairs read back from an activation store, held in RAM as one fp16/fp32 block.

A *pair* is one (positive response, negative response) of the data; it contributes ``length`` aligned token
positions. For a batch of pairs, :meth:`PairSet.batch` returns each distinct token activation once plus
indices saying where every (positive, negative) token of the batch sits among them — answers recur across the
pairs of a question, so this computes each distinct token once while the loss stays exactly the seed's stacked
per-pair loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from trainer.errors import StoreError
from trainer.store import ActivationStore


@dataclass
class TokenBatch:
    """``x`` (L, U, h) float32 distinct activations; ``pos``/``neg`` (n,) indices into U of the aligned tokens."""

    x: Tensor
    pos: Tensor
    neg: Tensor


class PairSet:
    """All pairs of a store. ``pair_rows[p]`` = (pos rows, neg rows) into ``activations`` (N, L, h)."""

    def __init__(
        self, activations: Tensor, pos_rows: Tensor, neg_rows: Tensor, pair_offsets: Tensor, pair_question: Tensor
    ) -> None:
        self.activations = activations  # (N, L, h)
        self.pos_rows = pos_rows  # (T,) row of the positive token of each aligned position
        self.neg_rows = neg_rows  # (T,)
        self.pair_offsets = pair_offsets  # (P + 1,) aligned positions of pair p: offsets[p]:offsets[p + 1]
        self.pair_question = pair_question  # (P,) source question index

    @property
    def num_pairs(self) -> int:
        return int(self.pair_offsets.shape[0] - 1)

    @property
    def num_layers(self) -> int:
        return int(self.activations.shape[1])

    @property
    def hidden_size(self) -> int:
        return int(self.activations.shape[2])

    @classmethod
    def from_store(cls, store: ActivationStore, max_ram_mb: int | None = None) -> PairSet:
        store.require_complete()
        if max_ram_mb is not None:
            need = sum(s.bytes for s in store.shards) / 2**20
            if need > max_ram_mb:
                raise StoreError(
                    f"{store.directory}: activations take {need:.0f} MiB, over --max-ram-mb {max_ram_mb}; "
                    "raise it or extract fewer pairs (--max-pairs-per-question)"
                )
        acts: list[Tensor] = []
        pos_rows: list[Tensor] = []
        neg_rows: list[Tensor] = []
        lengths: list[Tensor] = []
        questions: list[Tensor] = []
        base = 0
        for shard in store.iter_shards():
            a = shard["activations"]
            offsets = shard["answer_offsets"]
            pa = shard["pair_answers"]
            start, length = shard["pair_start"], shard["pair_length"]
            if pa.shape[0]:
                # aligned position k of pair p sits at offsets[answer] + start[p] + k for both responses
                steps = torch.repeat_interleave(length)  # (T,) pair id per aligned position
                k = torch.arange(steps.shape[0]) - torch.repeat_interleave(torch.cumsum(length, 0) - length, length)
                pos_rows.append(base + offsets[pa[steps, 0]] + start[steps] + k)
                neg_rows.append(base + offsets[pa[steps, 1]] + start[steps] + k)
                lengths.append(length)
                questions.append(shard["answer_question"][pa[:, 0]])
            acts.append(a)
            base += a.shape[0]
        if not lengths:
            raise StoreError(f"{store.directory}: no training pairs left (all dropped or no data)")
        all_lengths = torch.cat(lengths)
        offsets_t = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(all_lengths, 0)])
        return cls(torch.cat(acts), torch.cat(pos_rows), torch.cat(neg_rows), offsets_t, torch.cat(questions))

    def batches(self, batch_pairs: int, generator: torch.Generator, shuffle: str = "questions") -> list[Tensor]:
        """Pair-index batches for one epoch.

        ``questions``: questions in a random order, their pairs shuffled within, cut into batches of
        ``batch_pairs`` (so pairs of one question tend to share a batch and its distinct tokens).
        ``pairs``: every pair shuffled independently.
        """
        if shuffle == "pairs":
            order = torch.randperm(self.num_pairs, generator=generator)
        elif shuffle == "questions":
            qs = torch.unique(self.pair_question)
            perm = qs[torch.randperm(qs.shape[0], generator=generator)]
            rank = torch.empty(int(qs.max()) + 1, dtype=torch.long)
            rank[perm] = torch.arange(perm.shape[0])
            jitter = torch.rand(self.num_pairs, generator=generator)
            order = torch.argsort(rank[self.pair_question].double() + jitter.double() * 0.5)
        else:
            raise ValueError(f"shuffle must be 'questions' or 'pairs', got {shuffle!r}")
        return list(torch.split(order, batch_pairs))

    def positions(self, pairs: Tensor) -> Tensor:
        """Aligned-position indices (into pos_rows/neg_rows) of ``pairs``."""
        starts, ends = self.pair_offsets[pairs], self.pair_offsets[pairs + 1]
        lengths = ends - starts
        k = torch.arange(int(lengths.sum())) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
        return torch.repeat_interleave(starts, lengths) + k

    def batch(self, pairs: Tensor, layers: Sequence[int] | None = None) -> TokenBatch:
        steps = self.positions(pairs)
        rows = torch.cat([self.pos_rows[steps], self.neg_rows[steps]])  # (2n,)
        unique, inverse = torch.unique(rows, return_inverse=True)
        x = self.activations[unique]  # (U, L, h)
        if layers is not None:
            x = x[:, list(layers)]
        n = steps.shape[0]
        return TokenBatch(x=x.float().transpose(0, 1).contiguous(), pos=inverse[:n], neg=inverse[n:])

    def token_batches(self, batch_tokens: int) -> list[Tensor]:
        """Aligned-position chunks (in order) for evaluation."""
        return list(torch.split(torch.arange(int(self.pair_offsets[-1])), batch_tokens))

    def token_batch(self, steps: Tensor) -> TokenBatch:
        rows = torch.cat([self.pos_rows[steps], self.neg_rows[steps]])
        unique, inverse = torch.unique(rows, return_inverse=True)
        n = steps.shape[0]
        x = self.activations[unique].float().transpose(0, 1).contiguous()  # (L, U, h)
        return TokenBatch(x=x, pos=inverse[:n], neg=inverse[n:])
