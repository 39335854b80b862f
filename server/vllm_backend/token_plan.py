"""Per-request edits on vLLM's packed batch: which token of the step gets which edit, at which layer.

vLLM runs every scheduled token of a step as one ``(num_tokens, h)`` tensor, request after request in the order of
its input batch. A :class:`TokenPlan` is built once per forward, on the host, from each request's
:class:`RequestEdit` (sent through ``SamplingParams.extra_args``) and its tokens' positions. It groups the edited
tokens by (layer, adapter), so the edit op at each layer gathers exactly the tokens it edits and nothing else: a
token without an edit is never touched. The scope rule and the token limit are :class:`~hpr.edit_spec.EditSpec`'s,
applied to each token's own position, so a prefill that vLLM splits into chunks over several steps gets the same
edit as one done whole.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from hpr.edit_spec import EditSpec

EXTRA_ARGS_KEY = "hpr"  # SamplingParams.extra_args[EXTRA_ARGS_KEY] holds a RequestEdit as a dict


@dataclass(frozen=True)
class RequestEdit:
    """What the worker needs of one request's edit: the spec, with ``spec.adapter`` the adapter's *worker key*
    (name and version: an adapter reloaded under the same name is another key), and whether to count statistics."""

    spec: EditSpec
    request_id: str  # the engine's id of the request (vLLM may add a suffix to its own)
    stats: bool = False

    def to_extra_args(self) -> dict[str, Any]:
        s = self.spec
        return {
            EXTRA_ARGS_KEY: {
                "adapter": s.adapter,
                "layers": list(s.layers),
                "alpha": s.alpha,
                "scope": s.scope,
                "tokens": s.tokens,
                "stats": self.stats,
                "request_id": self.request_id,
            }
        }

    @classmethod
    def from_extra_args(cls, extra: Mapping[str, Any] | None) -> RequestEdit | None:
        """The edit in a request's ``extra_args`` (None: no edit, or an edit that changes nothing)."""
        raw = (extra or {}).get(EXTRA_ARGS_KEY)
        if not raw:
            return None
        spec = EditSpec(
            adapter=str(raw["adapter"]),
            layers=tuple(int(x) for x in raw["layers"]),
            alpha=float(raw["alpha"]),
            scope=raw["scope"],
            tokens=raw.get("tokens"),
        )
        if spec.is_noop:
            return None
        return cls(spec=spec, request_id=str(raw.get("request_id", "")), stats=bool(raw.get("stats", False)))


@dataclass
class TokenGroup:
    """The tokens of one step that one adapter edits at one layer."""

    adapter: str  # worker key
    tokens: Tensor  # (n,) long: indices into the step's packed tokens
    alpha: Tensor  # (n,) float32: each token's request's strength
    rows: Tensor | None  # (n,) long: each token's row in TokenPlan.sums (None: no statistics wanted)
    every_token: bool = False  # tokens == arange(num_tokens): the op edits the step's tensor without a gather


@dataclass
class TokenPlan:
    """One forward's edits. ``stat_ids`` are the request ids whose statistics ``sums`` (rows, num_layers, 3) holds."""

    num_tokens: int
    groups: dict[int, list[TokenGroup]]
    stat_ids: list[str] = field(default_factory=list)
    sums: Tensor | None = None  # (len(stat_ids), num_layers, len(SUMS)) float32, filled by the edit op


def build_token_plan(
    edits: Sequence[RequestEdit | None],
    request_ids: Sequence[str],
    prompt_lengths: Sequence[int],
    token_counts: Sequence[int],
    positions: Tensor,
    num_layers: int,
    device: torch.device,
) -> TokenPlan | None:
    """The plan of one step, or None when no token of it is edited.

    Args:
        edits, request_ids, prompt_lengths, token_counts: per request of the step, in batch order: its edit, id,
            prompt length and number of tokens scheduled in this step (the step's tokens are the requests' runs,
            back to back).
        positions: (≥ sum(token_counts),) each token's position in its sequence (on the host).
    """
    if all(e is None for e in edits):
        return None
    # (layer, adapter, counts statistics) → the tokens, alphas and statistics rows of its requests
    keyed: dict[tuple[int, str, bool], tuple[list[Tensor], list[Tensor], list[Tensor]]] = {}
    stat_ids: list[str] = []
    start = 0
    for edit, rid, prompt, count in zip(edits, request_ids, prompt_lengths, token_counts, strict=True):
        begin, start = start, start + count
        if edit is None or count == 0:
            continue
        spec = edit.spec
        pos = positions[begin : begin + count]  # (count,)
        keep = pos >= spec.first_edited_position(prompt)
        end = spec.edited_positions_end(prompt)
        if end is not None:
            keep = keep & (pos < end)
        index = keep.nonzero().flatten() + begin  # (n,)
        if index.numel() == 0:
            continue
        alpha = torch.full((index.numel(),), spec.alpha, dtype=torch.float32)
        row = torch.full((index.numel(),), len(stat_ids), dtype=torch.long)
        if edit.stats:
            stat_ids.append(rid)
        for layer in spec.layers:
            tokens, alphas, rows = keyed.setdefault((layer, spec.adapter, edit.stats), ([], [], []))
            tokens.append(index)
            alphas.append(alpha)
            rows.append(row)
    if not keyed:
        return None
    groups: dict[int, list[TokenGroup]] = {}
    total = int(sum(token_counts))
    for (layer, adapter, counted), (tokens, alphas, rows) in sorted(keyed.items()):
        index = torch.cat(tokens)  # ascending: requests in batch order, each one's positions in order
        groups.setdefault(layer, []).append(
            TokenGroup(
                adapter=adapter,
                tokens=index.to(device, non_blocking=True),
                alpha=torch.cat(alphas).to(device, non_blocking=True),
                rows=torch.cat(rows).to(device, non_blocking=True) if counted else None,
                every_token=index.numel() == total,
            )
        )
    sums = torch.zeros((len(stat_ids), num_layers, 3), dtype=torch.float32, device=device) if stat_ids else None
    return TokenPlan(num_tokens=total, groups=groups, stat_ids=stat_ids, sums=sums)
