"""Attaching HPR edits to a Hugging Face model, driven per forward pass by a per-row :class:`EditPlan`.

One forward hook per decoder layer is registered once (:class:`HPREditor`). Each forward pass runs under
``with editor.apply(plan):``; the plan says, for every batch row, which adapter, which layers, which alpha and
which positions. Rows with nothing to edit are never touched (no gather, no arithmetic), so requests with
different edits — or none — share one forward pass. The editor looks adapters up in an
:class:`~hpr.registry.AdapterRegistry` (which validates and resolves edits, and knows nothing of hooks) and
calls each layer's :class:`~hpr.edit_module.EditModule`, whatever its method. This module is the Hugging Face
backend's part: it assumes decoder layers that output (B, T, h); a packed-token backend (vLLM) maps the same
EditPlan onto its (tokens, h) layout instead (docs/architecture.md).

What a row gets, batched among others, compared with the same request alone (docs/server.md, "Exactness"):

- A row without an edit is bit-identical to the same batch with no edit anywhere: other rows' edits never reach it.
- An edited row gets its own edit, with the same probe decisions a batch of any shape would give it on the same
  activations (the sign of w·x is taken in float64, :func:`hpr.householder.probe_margin`).
- It is not bit-identical to the row alone: the base model's batched and single forwards round differently
  (left padding, kernel blocking), ~1e-5 in logprobs on SmolLM2 in float32, and a rotation carries that on — more
  at higher alpha. A token whose activation lies within that rounding of a probe's hyperplane could be rotated in
  one and not the other, and since the edit jumps there (θ does not go to 0 at the hyperplane) the row's output
  could then differ by much more. Measured on SmolLM2 with the trained TruthfulQA adapter, 100 prompts × 24
  greedy tokens, batched vs alone: no request's tokens differed and no probe decision flipped, at alpha 2 and 4;
  logprobs within 1.3e-4 at alpha 2 and 1.5e-3 at alpha 4 (no edit: 4.5e-5). ``bench/exactness.py`` measures it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from hpr.checkpoint import HPRAdapter
from hpr.decoder_layers import find_decoder_layers, hidden_size, layer_output_tensor, replace_layer_output
from hpr.edit_spec import EditSpec, EditTokens, Scope
from hpr.edit_stats import EditStats, EditStatsCounter, empty_sums
from hpr.registry import AdapterRegistry, parse_layers

__all__ = ["EditPlan", "EditSpec", "HPREditor", "Scope", "parse_layers"]


@dataclass
class _Group:
    """Rows of one layer that share an adapter: gathered, edited and scattered back together."""

    adapter: str
    rows: Tensor  # (n,) long
    alpha: Tensor  # (n, 1) float32
    mask: Tensor | None  # (n, T) bool, None = every position
    all_rows: bool  # rows == arange(B): no gather/scatter needed


@dataclass
class EditPlan:
    """Per-row edits for one forward pass over a batch of ``len(rows)`` rows.

    Args:
        rows: one :class:`EditSpec` (or None) per batch row.
        positions: (B, T) absolute token positions of the input, needed for scope ``generated`` when the input
            is not a fresh unpadded prompt (None = ``arange(T)`` for every row).
        prompt_lengths: per row, the prompt's length in tokens; scope ``generated`` edits positions
            ≥ prompt_length − 1 (the last prompt token and the generated ones), and a spec's ``tokens`` limit
            positions < prompt_length − 1 + tokens. None = the whole current input is the prompt.
        collect_stats: accumulate per (row, layer) statistics (read them with :meth:`row_stats`, or move them
            into per-request counters with :meth:`flush_stats`).
        valid: (B, T) bool, False at padding positions of a padded batch: those are never edited nor counted
            (None = every position is a real token).
        flat: the forward's input is one flattened sequence (1, len(rows)) whose token ``i`` is row ``i`` (with
            T = 1 in ``positions`` and ``valid``): the engine's mixed decode + prefill forwards.
    """

    rows: Sequence[EditSpec | None]
    positions: Tensor | None = None
    prompt_lengths: Sequence[int] | None = None
    collect_stats: bool = False
    valid: Tensor | None = None
    flat: bool = False
    sums: Tensor | None = field(default=None, init=False)  # (B, num_layers, len(SUMS)) float32 while collecting
    _groups: dict[int, list[_Group]] = field(default_factory=dict, init=False, repr=False)
    _compiled_for: int | None = field(default=None, init=False, repr=False)
    _layers: frozenset[int] = field(default=frozenset(), init=False, repr=False)

    def __post_init__(self) -> None:
        self._layers = frozenset(x for r in self.rows if r is not None and not r.is_noop for x in r.layers)

    @property
    def is_noop(self) -> bool:
        return all(r is None or r.is_noop for r in self.rows)

    @property
    def layers(self) -> list[int]:
        """The layers some row edits, in order."""
        return sorted(self._layers)

    def row_stats(self, row: int) -> EditStats:
        """Statistics of ``row`` over the forward passes run with this plan (since the last flush)."""
        spec = self.rows[row]
        layers = spec.layers if spec is not None and not spec.is_noop else ()
        return EditStats.from_sums(self.sums[row] if self.sums is not None else None, layers)

    def flush_stats(self, counters: Sequence[EditStatsCounter | None]) -> None:
        """Add each row's sums into its request's counter (one per row; None = not collected), then reset them.

        Stays on the device: no host sync.
        """
        if self.sums is None:
            return
        for row, counter in enumerate(counters):
            if counter is not None:
                counter.add(self.sums[row])
        self.sums = None

    def compile(self, seq_len: int, device: torch.device) -> None:
        """Build the per-layer groups (index tensors on ``device``) for an input of ``seq_len`` tokens.

        Called by the editor's hook on the first edited layer of each forward pass; cached per ``seq_len``.
        """
        if self._compiled_for == seq_len:
            return
        self._compiled_for = seq_len
        self._groups = {}
        batch = len(self.rows)
        if self.is_noop:
            return
        positions = self.positions
        if positions is None:
            positions = torch.arange(seq_len, device=device).expand(batch, seq_len)
        positions = positions.to(device)
        keyed: dict[tuple[int, str], list[int]] = {}
        for i, spec in enumerate(self.rows):
            if spec is None or spec.is_noop:
                continue
            for layer in spec.layers:
                keyed.setdefault((layer, spec.adapter), []).append(i)
        valid = self.valid.to(device) if self.valid is not None else None  # (B, T)
        mask_cache: dict[int, Tensor | None] = {}
        for i, spec in enumerate(self.rows):
            row_mask: Tensor | None = None
            if spec is None or spec.is_noop:
                pass
            elif spec.scope == "generated" or spec.tokens is not None:
                prompt = self.prompt_lengths[i] if self.prompt_lengths is not None else int(positions[i].max()) + 1
                row_mask = positions[i] >= spec.first_edited_position(prompt)  # (T,)
                end = spec.edited_positions_end(prompt)
                if end is not None:
                    row_mask = row_mask & (positions[i] < end)
            if valid is not None and spec is not None and not spec.is_noop:
                row_mask = valid[i] if row_mask is None else row_mask & valid[i]
            mask_cache[i] = row_mask
        for (layer, adapter), idx in sorted(keyed.items()):
            specs = [self.rows[i] for i in idx]
            masks = [mask_cache[i] for i in idx]
            mask: Tensor | None = None
            if any(m is not None for m in masks):
                full = torch.ones(seq_len, dtype=torch.bool, device=device)
                mask = torch.stack([m if m is not None else full for m in masks])  # (n, T)
            # Built on the host and copied with non_blocking: a blocking host→device copy is a stream sync on CUDA.
            rows = torch.tensor(idx, dtype=torch.long).to(device, non_blocking=True)  # (n,)
            alphas = torch.tensor([[s.alpha] for s in specs if s is not None], dtype=torch.float32)  # (n, 1)
            group = _Group(
                adapter=adapter,
                rows=rows,
                alpha=alphas.to(device, non_blocking=True),
                mask=mask,
                all_rows=idx == list(range(batch)),
            )
            self._groups.setdefault(layer, []).append(group)

    def groups(self, layer: int, seq_len: int, device: torch.device) -> list[_Group]:
        if layer not in self._layers:
            return []
        self.compile(seq_len, device)
        return self._groups.get(layer, [])


class HPREditor:
    """Owns the forward hooks that apply edit plans to ``model``; ``detach()`` leaves the model exactly as before.

    Adapters come from ``registry`` (an :class:`AdapterRegistry`, bound here to the model's shape and device) or,
    for scripts and tests, a plain mapping of name → adapter (a private registry is made from it).
    """

    def __init__(self, model: nn.Module, adapters: AdapterRegistry | Mapping[str, HPRAdapter] | None = None) -> None:
        self.model = model
        self.blocks = find_decoder_layers(model)
        self.num_layers = len(self.blocks)
        self.device = next(model.parameters()).device
        if isinstance(adapters, AdapterRegistry):
            self.registry = adapters
            if self.registry.hidden_size is None:
                self.registry.bind(hidden_size(model), self.num_layers, self.device)
        else:
            self.registry = AdapterRegistry.of(adapters or {}, hidden_size(model), self.num_layers, self.device)
        self._plan: EditPlan | None = None
        self._handles: list[Any] = []
        for index, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_hook(self._make_hook(index)))

    # Conveniences for scripts that own a private registry (the server goes through the registry itself).
    @property
    def adapters(self) -> dict[str, HPRAdapter]:
        return dict(self.registry.items())

    def add_adapter(self, name: str, adapter: HPRAdapter) -> None:
        self.registry.add(name, adapter)

    def resolve(
        self,
        adapter: str,
        layers: str | Sequence[int] | None = "selected",
        alpha: float | None = None,
        scope: Scope | None = None,
        tokens: EditTokens | None = None,
    ) -> EditSpec:
        """:meth:`AdapterRegistry.resolve` on this editor's registry."""
        return self.registry.resolve(adapter, layers, alpha, scope, tokens)

    @contextmanager
    def apply(self, plan: EditPlan | None) -> Iterator[EditPlan | None]:
        """Run forward passes inside this block with ``plan`` (None = no edit at all)."""
        if plan is not None and plan.collect_stats and plan.sums is None:
            plan.sums = empty_sums(len(plan.rows), self.num_layers, self.device)
        previous, self._plan = self._plan, plan
        try:
            yield plan
        finally:
            self._plan = previous

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._plan = None

    def _make_hook(self, layer: int) -> Any:
        def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
            plan = self._plan
            if plan is None:
                return None
            hidden = layer_output_tensor(output)  # (B, T, h)
            shape = hidden.shape
            if plan.flat:
                hidden = hidden.reshape(-1, 1, shape[-1])  # (1, B, h) → (B, 1, h): each token its own row
            groups = plan.groups(layer, hidden.shape[1], hidden.device)
            if not groups:
                return None
            for group in groups:
                module = self.registry.get(group.adapter).edit_module(layer)
                x = hidden if group.all_rows else hidden.index_select(0, group.rows)  # (n, T, h)
                mask = group.mask
                result = module.edit(x, group.alpha, mask)
                hidden = result.output if group.all_rows else hidden.index_copy(0, group.rows, result.output)
                if plan.sums is not None:
                    seen = mask.sum(-1).float() if mask is not None else torch.full_like(group.alpha[:, 0], x.shape[1])
                    changed = result.changed.sum(-1).float()  # (n,)
                    upd = torch.stack([seen, changed, result.amount.sum(-1)], dim=-1)  # (n, len(SUMS))
                    plan.sums[group.rows, layer] += upd
            return replace_layer_output(output, hidden.reshape(shape))

        return hook
