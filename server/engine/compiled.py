"""A compiled decode step: the model, its KV cache writes and the HPR edits as one ``torch.compile`` graph.

The eager decode step (:meth:`ModelRunner._decode_forward`) calls the model's own forward, which runs the edits
as forward hooks and appends to the cache at a Python-int column. Neither can be compiled as they are: a hook
reads the plan object of the step, and the column changes every step (a recompile each time). Here one decode
step is a function of tensors:

- **The KV cache is static within a step.** Each layer's preallocated buffer (B, H_kv, capacity, D) gets the new
  column by ``index_copy_`` at a position given as a tensor, and attention reads the *whole* buffer with a mask
  of the columns in use (B, 1, 1, capacity). Columns past the used ones are zeros (``GrowableLayer`` allocates
  them so), never garbage: a masked column still enters attention as 0 × value.
- **The edits are inline, not hooks.** For every (layer, adapter) pair the batch uses there is one entry: the
  adapter's module for that layer, a per-row alpha (B, 1) and a per-row mask (B, 1) of the rows that use it.
  Every row goes through the module's ``edit``; a row outside the mask is left unchanged and not counted, so rows
  with different edits (or none) share the step. Statistics are summed in the graph per (row, layer).
- **What recompiles:** the graph is specialised on the batch's set of (layer, adapter) pairs (the module
  objects), on whether statistics are collected and on a batch of one row or more; alphas are tensors and never
  recompile. The batch size and the cache capacity are dynamic dimensions: one graph serves every size.
- **Graphs are few, on purpose:** on a CPU each frozen graph holds its own packed copy of the weights (SmolLM2
  fp32: 0.65-0.8 GB per graph, experiments/compiled_memory.py). After ``max_graphs`` graphs, a step that would need
  another runs eagerly (:meth:`CompiledDecoder.forward` returns None), so varied edits cannot exhaust memory.

Only for models whose loop is Llama's (:data:`~server.engine.mixed.MIXABLE_MODEL_TYPES`), with SDPA attention and
no sliding window, as the mixed prefill; :func:`server.engine.support.check_options` refuses the rest at startup.
On CUDA the same graph runs without CUDA graphs (``mode="default"``): the batch size is not bucketed here.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from hpr.edit_module import EditModule
from hpr.edit_stats import SUMS
from hpr.editing import EditPlan
from hpr.registry import AdapterRegistry
from server.engine.kv_cache import BatchKVCache
from server.engine.mixed import MIXABLE_MODEL_TYPES, can_mix
from server.engine.types import MAX_GRAPHS

# Recompiles dynamo allows the step; past it dynamo runs the step eagerly, which is still correct. The engine's
# own bound (max_graphs) is lower: this only guards against a guard failing where none was expected.
RECOMPILE_LIMIT = 32
AUTOTUNE_MODE = "max-autotune-no-cudagraphs"  # CUDA graphs would need bucketed batch sizes (module docstring)


def can_compile(model: nn.Module) -> bool:
    """Whether the compiled step can run ``model`` (Llama's loop, SDPA, no sliding window)."""
    return can_mix(model)


@dataclass(frozen=True)
class InlineEdit:
    """One (layer, adapter) pair of a decode step: its module, and per row the alpha and whether it applies."""

    layer: int
    module: EditModule
    alpha: Tensor  # (B, 1) float32, 0 where the row does not use this pair
    rows: Tensor  # (B, 1) bool: the row uses this pair


def inline_edits(plan: EditPlan | None, registry: AdapterRegistry, device: torch.device) -> tuple[InlineEdit, ...]:
    """The decode ``plan``'s edits as per-row tensors: its own per-layer groups (one per (layer, adapter) pair, as
    the eager hook applies them), each widened from its rows to the whole batch, in layer order.

    A decode plan edits whole rows (its specs have scope ``all``: :func:`~server.engine.batch.decode_spec`)."""
    if plan is None or plan.is_noop:
        return ()
    batch = len(plan.rows)
    edits = []
    for layer in plan.layers:
        for group in plan.groups(layer, 1, device):
            if group.mask is not None:
                raise ValueError("a compiled decode step edits whole rows: scope must be 'all' at decode")
            alpha = torch.zeros((batch, 1), dtype=torch.float32, device=device).index_copy(0, group.rows, group.alpha)
            rows = torch.zeros((batch, 1), dtype=torch.bool, device=device).index_fill(0, group.rows, True)
            edits.append(InlineEdit(layer, registry.get(group.adapter).edit_module(layer), alpha, rows))
    return tuple(edits)


class _ColumnWriter:
    """The cache the compiled step hands to each attention layer: writes the new keys/values in place at
    ``column`` and returns the whole buffers (attention masks the columns not in use)."""

    def __init__(self, keys: Sequence[Tensor], values: Sequence[Tensor], column: Tensor) -> None:
        self.keys = keys
        self.values = values
        self.column = column  # (1,) long

    def update(
        self, key_states: Tensor, value_states: Tensor, layer_idx: int, *_: Any, **__: Any
    ) -> tuple[Tensor, Tensor]:
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.index_copy_(2, self.column, key_states)  # (B, H_kv, capacity, D) ← (B, H_kv, 1, D)
        values.index_copy_(2, self.column, value_states)
        return keys, values


def _decode_step(
    model: nn.Module,
    ids: Tensor,
    positions: Tensor,
    mask: Tensor,
    column: Tensor,
    keys: list[Tensor],
    values: list[Tensor],
    edits: tuple[InlineEdit, ...],
    num_layers: int,
    stats: bool,
) -> tuple[Tensor, Tensor | None]:
    """One decode step of a ``model`` with Llama's loop: ids (B, 1) at positions (B, 1), attending to the cache columns
    where ``mask`` (B, 1, 1, capacity) is True, the new column written at ``column``. Returns the logits (B, V)
    float32 and, with ``stats``, the edit sums (B, num_layers, len(SUMS))."""
    inner: Any = model.model  # LlamaModel: embed_tokens, rotary_emb, layers, norm
    hidden = inner.embed_tokens(ids)  # (B, 1, h)
    embeddings = inner.rotary_emb(hidden, position_ids=positions)
    cache = _ColumnWriter(keys, values, column)
    sums = torch.zeros((ids.shape[0], num_layers, len(SUMS)), dtype=torch.float32, device=ids.device) if stats else None
    by_layer: dict[int, list[InlineEdit]] = {}
    for edit in edits:
        by_layer.setdefault(edit.layer, []).append(edit)
    for index, layer in enumerate(inner.layers[:num_layers]):
        hidden = layer(hidden, attention_mask=mask, position_embeddings=embeddings, position_ids=positions, cache=cache)
        for edit in by_layer.get(index, ()):
            result = edit.module.edit(hidden, edit.alpha, edit.rows)  # (B, 1, h); rows outside the mask unchanged
            hidden = result.output
            if sums is not None:
                seen = edit.rows[:, 0].float()
                upd = torch.stack([seen, result.changed.float()[:, 0], result.amount[:, 0]], dim=-1)  # (B, len(SUMS))
                sums[:, index] += upd
    hidden = inner.norm(hidden)
    head: Any = model.lm_head
    logits = head(hidden[:, -1, :]).float()  # (B, V)
    return logits, sums


class CompiledDecoder:
    """Runs decode steps through one ``torch.compile``'d :func:`_decode_step` (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        registry: AdapterRegistry,
        num_layers: int,
        max_graphs: int = MAX_GRAPHS,
        autotune: bool = False,
    ) -> None:
        if not can_compile(model):
            config = getattr(model, "config", None)
            raise ValueError(
                f"the compiled decode step cannot run model type {getattr(config, 'model_type', '?')!r} with "
                f"attn_implementation {getattr(config, '_attn_implementation', '?')!r} (it runs "
                f"{sorted(MIXABLE_MODEL_TYPES)} with 'sdpa' and no sliding window)"
            )
        self.model = model
        self.registry = registry
        self.num_layers = num_layers
        self.device = next(model.parameters()).device
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        # On a CPU, inductor's freezing treats the weights as constants and prepacks them for oneDNN's matmuls: at
        # batch 1 that took the step from 1.11x to 1.30x the eager one (docs/benchmarks.md), for a second copy of
        # the linear weights in the packed layout. The weights must not change after the first compile; a new
        # adapter is a new module object and recompiles.
        # Inductor's config is per thread: it is set on the engine thread, before its first compile (set here, on
        # the constructing thread, or passed as torch.compile(options=...), it did not apply: 1.07-1.17x measured).
        self._freeze = self.device.type == "cpu"
        # autotune: inductor times its generated matmul kernels against the library's (oneDNN/MKL on a CPU) and keeps
        # the faster; at batch 1 on the development CPU 1.09x the default, compiling twice as long.
        self.mode = AUTOTUNE_MODE if autotune else None
        self._step = torch.compile(_decode_step, mode=self.mode)
        self._edits: tuple[object, tuple[InlineEdit, ...]] | None = None  # (plan, its inline edits)
        if max_graphs < 1:
            raise ValueError("max_graphs must be ≥ 1")
        self.max_graphs = max_graphs
        self.graphs: set[tuple[Hashable, ...]] = set()  # the keys (graph_key) of the graphs compiled so far

    def edits_for(self, plan: EditPlan | None) -> tuple[InlineEdit, ...]:
        """The plan's inline edits, built once per plan (a decode plan lives as long as its batch's rows)."""
        if self._edits is None or self._edits[0] is not plan:
            edits = inline_edits(plan, self.registry, self.device)
            for edit in edits:
                torch._dynamo.maybe_mark_dynamic(edit.alpha, 0)
                torch._dynamo.maybe_mark_dynamic(edit.rows, 0)
            self._edits = (plan, edits)
        return self._edits[1]

    @staticmethod
    def graph_key(edits: Sequence[InlineEdit], batch: int, stats: bool) -> tuple[Hashable, ...]:
        """What selects a graph: the (layer, module) pairs, statistics on or off, and one row or more."""
        return (tuple((e.layer, e.module) for e in edits), stats, batch == 1)

    def forward(
        self, cache: BatchKVCache, ids: Tensor, positions: Tensor, pad: Tensor, plan: EditPlan | None
    ) -> Tensor | None:
        """Logits (B, V) float32 of ``ids`` (B, 1) appended to ``cache`` (one column); the plan's statistics, if
        it collects them, go to ``plan.sums``. ``cache`` gains the column only when the step succeeds.

        None, with nothing done, when the step needs a graph not compiled yet and ``max_graphs`` are: the caller
        runs the eager step."""
        edits = self.edits_for(plan)
        stats = plan is not None and plan.collect_stats
        key = self.graph_key(edits, len(ids), stats)
        if key not in self.graphs:
            if len(self.graphs) >= self.max_graphs:
                return None
            self.graphs.add(key)  # compiled by the call below
        if self._freeze and not torch._inductor.config.freezing:
            torch._inductor.config.freezing = True  # this thread's (see __init__)
        length = cache.length
        cache.exact_buffers()  # the graph takes whole buffers, one row per batch row
        layers = cache.growable_layers
        for layer in layers:
            layer.reserve(length + 1)
        capacity = layers[0].capacity
        columns = torch.arange(capacity, device=self.device)
        mask = ((columns >= pad[:, None]) & (columns <= length))[:, None, None, :]  # (B, 1, 1, capacity)
        column = torch.tensor([length], dtype=torch.long, device=self.device)
        keys = [layer.keys for layer in layers if layer.keys is not None]
        values = [layer.values for layer in layers if layer.values is not None]
        # The batch size and the capacity are dynamic from the first compile: one graph for every size (dynamo
        # still gives a batch of 1 its own), not one per size met. Built afresh each step: marks cost nothing.
        for tensor in (ids, positions, mask):
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        torch._dynamo.maybe_mark_dynamic(mask, 3)
        for tensor in (*keys, *values):
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
            torch._dynamo.maybe_mark_dynamic(tensor, 2)
        logits, sums = self._step(self.model, ids, positions, mask, column, keys, values, edits, self.num_layers, stats)
        for layer in layers:
            layer.length = length + 1
        if plan is not None and sums is not None:
            plan.sums = sums if plan.sums is None else plan.sums + sums
        return logits
