"""Attaching HPR edits to a Hugging Face model, driven per forward pass by a per-row :class:`EditPlan`.

One forward hook per decoder layer is registered once (:class:`HPREditor`). Each forward pass runs under
``with editor.apply(plan):``; the plan says, for every batch row, which adapter, which layers, which alpha and
which positions. Rows with nothing to edit are never touched (no gather, no arithmetic), so requests with
different edits — or none — share one forward pass.

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

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from hpr.checkpoint import HPRAdapter
from hpr.decoder_layers import find_decoder_layers, layer_output_tensor, replace_layer_output
from hpr.errors import EditSpecError, UnknownAdapterError
from hpr.householder import MAX_ALPHA

Scope = Literal["all", "generated"]
STAT_FIELDS = ("tokens", "rotated", "angle_sum")  # per (row, layer) accumulators in EditPlan.stats


@dataclass(frozen=True)
class EditSpec:
    """What one request asks for: edit ``layers`` with ``adapter`` at strength ``alpha`` over ``scope``."""

    adapter: str
    layers: tuple[int, ...]
    alpha: float = 1.0
    scope: Scope = "all"

    def __post_init__(self) -> None:
        if not math.isfinite(self.alpha) or not 0.0 <= self.alpha <= MAX_ALPHA:
            raise EditSpecError(f"alpha must be a finite number in [0, {MAX_ALPHA}], got {self.alpha}", "hpr.alpha")
        if self.scope not in ("all", "generated"):
            raise EditSpecError(f"scope must be 'all' or 'generated', got {self.scope!r}", "hpr.scope")

    @property
    def is_noop(self) -> bool:
        return not self.layers or self.alpha == 0.0


def parse_layers(spec: str | Sequence[int] | None, adapter: HPRAdapter) -> tuple[int, ...]:
    """Resolve a layer spec against an adapter.

    ``"selected"`` (default) → the adapter's selected layers; ``"all"`` → every trained layer; ``"none"`` → ();
    a list of ints, or a string such as ``"10-14,20"``. Every layer must have a trained module.
    """
    param = "hpr.layers"
    if spec is None or spec == "selected":
        return tuple(adapter.config.selected_layers)
    if spec == "all":
        return tuple(adapter.config.layers)
    if spec == "none":
        return ()
    layers: list[int] = []
    if isinstance(spec, str):
        for part in spec.split(","):
            part = part.strip()
            m = re.fullmatch(r"(\d+)\s*-\s*(\d+)|(\d+)", part)
            if m is None:
                raise EditSpecError(
                    f"bad layer spec {spec!r}: use 'selected', 'all', 'none', a list of ints or e.g. '10-14,20'", param
                )
            if m.group(3) is not None:
                layers.append(int(m.group(3)))
            else:
                lo, hi = int(m.group(1)), int(m.group(2))
                if hi < lo:
                    raise EditSpecError(f"bad layer range {part!r}: end before start", param)
                layers.extend(range(lo, hi + 1))
    else:
        for item in spec:
            if isinstance(item, bool) or not isinstance(item, int):
                raise EditSpecError(f"layers must be integers, got {item!r}", param)
            layers.append(item)
    n = adapter.config.num_layers
    out_of_range = sorted({x for x in layers if not 0 <= x < n})
    if out_of_range:
        raise EditSpecError(f"layers {out_of_range} out of range: the model has layers 0-{n - 1}", param)
    untrained = sorted(set(layers) - set(adapter.config.layers))
    if untrained:
        raise EditSpecError(
            f"layers {untrained} have no trained module in adapter {adapter.name!r} (trained: {adapter.config.layers})",
            param,
        )
    return tuple(sorted(set(layers)))


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
            ≥ prompt_length − 1 (the last prompt token and the generated ones). None = the whole current input is
            the prompt.
        collect_stats: accumulate per (row, layer) tokens seen / rotated / angle sum into ``stats``.
        valid: (B, T) bool, False at padding positions of a padded batch: those are never edited nor counted
            (None = every position is a real token).
    """

    rows: Sequence[EditSpec | None]
    positions: Tensor | None = None
    prompt_lengths: Sequence[int] | None = None
    collect_stats: bool = False
    valid: Tensor | None = None
    stats: Tensor | None = field(default=None, init=False)  # (B, num_layers, 3) float32 once compiled
    _groups: dict[int, list[_Group]] = field(default_factory=dict, init=False, repr=False)
    _compiled_for: int | None = field(default=None, init=False, repr=False)
    _layers: frozenset[int] = field(default=frozenset(), init=False, repr=False)

    def __post_init__(self) -> None:
        self._layers = frozenset(x for r in self.rows if r is not None and not r.is_noop for x in r.layers)

    @property
    def is_noop(self) -> bool:
        return all(r is None or r.is_noop for r in self.rows)

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
            elif spec.scope == "generated":
                start = (self.prompt_lengths[i] if self.prompt_lengths is not None else int(positions[i].max()) + 1) - 1
                row_mask = positions[i] >= start  # (T,)
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
    """Owns the hooks that apply HPR edits to ``model``; ``detach()`` leaves the model exactly as before."""

    def __init__(self, model: nn.Module, adapters: Mapping[str, HPRAdapter] | None = None) -> None:
        self.model = model
        self.blocks = find_decoder_layers(model)
        self.num_layers = len(self.blocks)
        self.device = next(model.parameters()).device
        self.adapters: dict[str, HPRAdapter] = {}
        self._plan: EditPlan | None = None
        self._handles: list[Any] = []
        for name, adapter in (adapters or {}).items():
            self.add_adapter(name, adapter)
        for index, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_hook(self._make_hook(index)))

    def add_adapter(self, name: str, adapter: HPRAdapter) -> None:
        hidden = getattr(getattr(self.model, "config", None), "hidden_size", None)
        if isinstance(hidden, int):
            adapter.check_compatible(hidden, self.num_layers)
        self.adapters[name] = adapter.to(device=self.device, dtype=torch.float32).eval().requires_grad_(False)

    def resolve(
        self,
        adapter: str,
        layers: str | Sequence[int] | None = "selected",
        alpha: float | None = None,
        scope: Scope | None = None,
    ) -> EditSpec:
        """Validate a request's edit against the loaded adapters and return the spec to put in a plan.

        ``alpha=None`` takes the adapter's ``default_alpha`` and ``scope=None`` its ``default_scope`` (the
        settings its evaluation chose).
        """
        if adapter not in self.adapters:
            raise UnknownAdapterError(
                f"adapter {adapter!r} is not loaded (loaded: {sorted(self.adapters)})", "hpr.adapter"
            )
        chosen = self.adapters[adapter]
        strength = chosen.config.default_alpha if alpha is None else alpha
        where: Any = chosen.config.default_scope if scope is None else scope
        return EditSpec(adapter=adapter, layers=parse_layers(layers, chosen), alpha=strength, scope=where)

    @contextmanager
    def apply(self, plan: EditPlan | None) -> Iterator[EditPlan | None]:
        """Run forward passes inside this block with ``plan`` (None = no edit at all)."""
        if plan is not None:
            for spec in plan.rows:
                if spec is not None and not spec.is_noop and spec.adapter not in self.adapters:
                    raise UnknownAdapterError(f"adapter {spec.adapter!r} is not loaded", "hpr.adapter")
            if plan.collect_stats and plan.stats is None:
                shape = (len(plan.rows), self.num_layers, len(STAT_FIELDS))
                plan.stats = torch.zeros(shape, dtype=torch.float32, device=self.device)
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
            groups = plan.groups(layer, hidden.shape[1], hidden.device)
            if not groups:
                return None
            for group in groups:
                module = self.adapters[group.adapter].layer(layer)
                x = hidden if group.all_rows else hidden.index_select(0, group.rows)  # (n, T, h)
                mask = group.mask
                result = module.edit(x, group.alpha, mask)
                hidden = result.output if group.all_rows else hidden.index_copy(0, group.rows, result.output)
                if plan.stats is not None:
                    seen = mask.sum(-1).float() if mask is not None else torch.full_like(group.alpha[:, 0], x.shape[1])
                    upd = torch.stack([seen, result.rotated.sum(-1).float(), result.theta.sum(-1)], dim=-1)  # (n, 3)
                    plan.stats[group.rows, layer] += upd
            return replace_layer_output(output, hidden)

        return hook
