"""Extracting decoder-layer outputs on response tokens into an :class:`~trainer.store.ActivationStore`.

What is captured: the output of every decoder layer (``hpr.decoder_layers.capture_layer_outputs``), i.e. exactly
the tensor the HPR edit hook later sees and rewrites — not ``output_hidden_states[-1]``, which is after the
final norm. Only response (answer) tokens are kept.

Pairs (seed rule): a (positive, negative) pair is aligned position by position over the shorter response
(m = min of the two lengths). Its *identical share* is the fraction of those m aligned positions holding the
same token id in both responses; pairs with a share ≥ 0.75 are dropped. Of a kept pair, the positions of the
two responses' common token prefix are skipped by default (their activations are bit-identical, so they would
teach the probe "positive" and "negative" for the same vector); ``keep_shared_prefix`` restores the seed's use of
all m positions.

Speed: the prefix shared by every prompt of the split (system prompt, or the 6-shot primer) runs once; each
question's prompt then runs once, continuing that cache; all answers of the question run as right-padded
batches continuing the question's cache. RAM holds at most one shard (``shard_mb``) plus one batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from hpr.decoder_layers import capture_layer_outputs, hidden_size, num_hidden_layers
from trainer.errors import StoreError
from trainer.prefix_cache import PrefixRunner, plan_batches
from trainer.prompts import EncodedQuestion, common_prefix_length
from trainer.store import ActivationStore, empty_shard

log = logging.getLogger(__name__)
STORE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class ExtractOptions:
    """How to turn encoded questions into stored activations."""

    max_identical: float = 0.75  # drop pairs whose aligned responses share at least this fraction of tokens
    keep_shared_prefix: bool = False  # True = the seed's behaviour: use every aligned position
    store_dtype: str = "float16"  # float16 halves disk and RAM; the fit stage computes in float32
    shard_mb: int = 256  # a shard holds questions until its activations reach this size
    batch_tokens: int = 2048  # padded tokens per forward pass of answers

    def __post_init__(self) -> None:
        if not 0.0 < self.max_identical <= 1.0:
            raise ValueError(f"max_identical must be in (0, 1], got {self.max_identical}")
        if self.store_dtype not in STORE_DTYPES:
            raise ValueError(f"store dtype must be one of {sorted(STORE_DTYPES)}, got {self.store_dtype!r}")
        if self.shard_mb < 1 or self.batch_tokens < 1:
            raise ValueError("shard_mb and batch_tokens must be positive")


@dataclass(frozen=True)
class PairAlignment:
    start: int  # first aligned position used
    length: int  # aligned positions used
    identical_share: float


def align_pair(positive: Sequence[int], negative: Sequence[int], keep_shared_prefix: bool) -> PairAlignment:
    """Position-wise alignment of two responses over the shorter one (see the module docstring)."""
    m = min(len(positive), len(negative))
    same = [positive[i] == negative[i] for i in range(m)]
    share = sum(same) / m if m else 1.0
    start = 0
    if not keep_shared_prefix:
        while start < m and same[start]:
            start += 1
    return PairAlignment(start=start, length=m - start, identical_share=share)


@dataclass
class QuestionPlan:
    """The pairs kept for one question and the answers they need."""

    question: EncodedQuestion
    answers: list[int]  # indices into question.answers, in storage order
    pairs: list[tuple[int, int, int, int]]  # (pos answer, neg answer, start, length); answers index question.answers
    dropped: int

    @property
    def tokens(self) -> int:
        return sum(len(self.question.answers[a]) for a in self.answers)


def plan_question(question: EncodedQuestion, options: ExtractOptions) -> QuestionPlan:
    pairs: list[tuple[int, int, int, int]] = []
    dropped = 0
    for pos, neg in question.pairs:
        al = align_pair(question.answers[pos], question.answers[neg], options.keep_shared_prefix)
        if al.identical_share >= options.max_identical or al.length <= 0:
            dropped += 1
            continue
        pairs.append((pos, neg, al.start, al.length))
    answers = sorted({a for p in pairs for a in p[:2]})
    return QuestionPlan(question, answers, pairs, dropped)


def plan_shards(plans: Sequence[QuestionPlan], bytes_per_token: int, shard_mb: int) -> list[list[QuestionPlan]]:
    """Deterministic grouping of questions into shards of at most ``shard_mb`` (a question is never split)."""
    limit = shard_mb * 2**20
    shards: list[list[QuestionPlan]] = [[]]
    size = 0
    for plan in plans:
        cost = plan.tokens * bytes_per_token
        if shards[-1] and size + cost > limit:
            shards.append([])
            size = 0
        shards[-1].append(plan)
        size += cost
    return shards if shards[0] else []


def store_settings(model: str, options: ExtractOptions, data: dict[str, Any]) -> dict[str, Any]:
    """What a store's content depends on; a store is reused only when these match exactly."""
    return {"model": model, "options": asdict(options), "data": data}


class Extractor:
    """Runs ``model`` over encoded questions and writes a store. ``model`` must be in eval mode."""

    def __init__(self, model: nn.Module, options: ExtractOptions) -> None:
        self.model = model
        self.options = options
        self.num_layers = num_hidden_layers(model)
        self.hidden = hidden_size(model)
        self.dtype = STORE_DTYPES[options.store_dtype]
        self.runner = PrefixRunner(model, body_only=True)
        self.response_tokens = 0  # tokens actually run through the model as responses (for throughput numbers)

    def _question_tensors(self, plan: QuestionPlan, prefix: Any, prefix_len: int) -> list[Tensor]:
        """(len_a, L, h) activations of each answer in ``plan.answers``."""
        q = plan.question
        q_cache, _ = self.runner.extend(prefix, q.prompt_ids[prefix_len:])
        rows = [q.answers[a] for a in plan.answers]
        out: list[Tensor | None] = [None] * len(rows)
        with capture_layer_outputs(self.model, range(self.num_layers)) as captured:
            for batch in plan_batches([len(r) for r in rows], self.options.batch_tokens):
                self.runner.continue_batch(q_cache, [rows[i] for i in batch])
                stacked = torch.stack([captured[layer] for layer in range(self.num_layers)], dim=2)  # (B, T, L, h)
                for j, i in enumerate(batch):
                    out[i] = stacked[j, : len(rows[i])].to("cpu", self.dtype)  # (len_i, L, h)
                self.response_tokens += sum(len(rows[i]) for i in batch)
        return [t for t in out if t is not None]

    def _shard_tensors(self, group: Sequence[QuestionPlan], prefix: Any, prefix_len: int) -> dict[str, Tensor]:
        acts: list[Tensor] = []
        offsets = [0]
        labels: list[int] = []
        qids: list[int] = []
        pairs: list[tuple[int, int, int, int]] = []
        for plan in group:
            if not plan.pairs:
                continue
            local = {a: len(labels) + k for k, a in enumerate(plan.answers)}
            for tensor, a in zip(self._question_tensors(plan, prefix, prefix_len), plan.answers, strict=True):
                acts.append(tensor)
                offsets.append(offsets[-1] + tensor.shape[0])
                labels.append(plan.question.labels[a])
                qids.append(plan.question.index)
            pairs.extend((local[p], local[n], s, m) for p, n, s, m in plan.pairs)
        if not acts:
            return empty_shard(self.num_layers, self.hidden, self.dtype)
        activations = torch.cat(acts)  # (N, L, h)
        if not torch.isfinite(activations).all():
            raise StoreError(
                f"activations overflow {self.options.store_dtype} (or the model produced NaN/inf); "
                "use --store-dtype float32"
            )
        pair_t = torch.tensor(pairs, dtype=torch.long).reshape(-1, 4)
        return {
            "activations": activations,
            "answer_offsets": torch.tensor(offsets, dtype=torch.long),
            "answer_label": torch.tensor(labels, dtype=torch.long),
            "answer_question": torch.tensor(qids, dtype=torch.long),
            "pair_answers": pair_t[:, :2].contiguous(),
            "pair_start": pair_t[:, 2].contiguous(),
            "pair_length": pair_t[:, 3].contiguous(),
        }

    @torch.inference_mode()
    def run(
        self,
        questions: Sequence[EncodedQuestion],
        store: ActivationStore,
        settings: dict[str, Any],
        desc: str = "",
        progress: bool = True,
    ) -> dict[str, Any]:
        """Extract ``questions`` into ``store`` (resuming it); returns a summary (pairs kept/dropped, tokens/s)."""
        if not questions:
            raise StoreError(f"{store.directory}: no questions to extract")
        store.open_for_writing(settings)
        plans = [plan_question(q, self.options) for q in questions]
        shards = plan_shards(plans, self.num_layers * self.hidden * self.dtype.itemsize, self.options.shard_mb)
        done = {s.file for s in store.shards}
        todo = [(i, g) for i, g in enumerate(shards) if f"shard-{i:05d}.safetensors" not in done]
        prefix_len = common_prefix_length([q.prompt_ids for q in questions])
        start = time.perf_counter()
        if todo:
            prefix = None
            if prefix_len:
                prefix, _ = self.runner.extend(None, questions[0].prompt_ids[:prefix_len])
            total = sum(len(g) for _, g in todo)
            with tqdm(
                total=total, desc=desc or f"extract {store.directory.name}", unit="q", leave=False, disable=not progress
            ) as bar:
                for index, group in todo:
                    tensors = self._shard_tensors(group, prefix, prefix_len)
                    store.write_shard(index, [p.question.index for p in group], tensors)
                    bar.update(len(group))
                    bar.set_postfix(tok_s=f"{self.response_tokens / max(time.perf_counter() - start, 1e-9):.0f}")
        elapsed = time.perf_counter() - start
        summary = {
            "questions": len(questions),
            "pairs_total": sum(len(p.question.pairs) for p in plans),
            "pairs_dropped_identical": sum(p.dropped for p in plans),
            "pairs_kept": sum(len(p.pairs) for p in plans),
            "stored_tokens": store.num_tokens,
            "shards": len(shards),
            "shards_reused": len(shards) - len(todo),
            "seconds": round(elapsed, 2),
            "response_tokens_per_s": round(self.response_tokens / elapsed, 1) if elapsed > 0 else None,
        }
        store.mark_complete(summary)
        return summary
