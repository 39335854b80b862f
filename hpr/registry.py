"""The adapters a base model can be edited with: load and validate them, resolve a request's edit, and unload
them at run time once no running request uses them.

No hooks, no torch model — as vLLM's LoRA adapter manager, adapters here are data. A backend binds the registry
to its model's shape (:meth:`AdapterRegistry.bind`), then applies the :class:`~hpr.edit_spec.EditSpec` s that
:meth:`AdapterRegistry.resolve` returns (the Hugging Face forward hooks are :class:`hpr.editing.HPREditor`).

Thread safety: loads and unloads may come from any thread while an engine thread reads adapters; every change
takes the lock, and :meth:`AdapterRegistry.get` (the hot path, once per edited layer and forward) reads a dict.

Unloading: a running request holds a lease on its adapter (:meth:`acquire` / :meth:`release`). :meth:`unload`
makes the adapter unroutable at once — a new request naming it gets :class:`UnknownAdapterError` — and drops it
when its last lease is released, so no batch ever meets an adapter that has gone.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from hpr.checkpoint import HPRAdapter, HPRConfig
from hpr.edit_spec import AdapterDefaults, EditSpec, EditTokens, Scope
from hpr.errors import AdapterConflictError, CheckpointError, EditSpecError, HPRError, UnknownAdapterError

log = logging.getLogger(__name__)


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


class AdapterRegistry:
    """Named adapters for one base model shape (hidden size, layer count), placed on the model's device."""

    def __init__(self, hidden_size: int | None = None, num_layers: int | None = None) -> None:
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.device = torch.device("cpu")
        self._lock = threading.Lock()
        self._adapters: dict[str, HPRAdapter] = {}  # every loaded adapter, unloading ones included
        self._unloading: set[str] = set()
        self._leases: dict[str, int] = {}

    @classmethod
    def of(
        cls, adapters: Mapping[str, HPRAdapter], hidden_size: int, num_layers: int, device: torch.device | None = None
    ) -> AdapterRegistry:
        """A bound registry holding ``adapters`` (validated against the shape)."""
        registry = cls()
        registry.bind(hidden_size, num_layers, device or torch.device("cpu"))
        for name, adapter in adapters.items():
            registry.add(name, adapter)
        return registry

    def bind(self, hidden_size: int, num_layers: int, device: torch.device) -> None:
        """Fix the base model's shape and device (the backend calls this once its model is loaded)."""
        with self._lock:
            if self._adapters and (hidden_size, num_layers) != (self.hidden_size, self.num_layers):
                raise HPRError("cannot re-bind a registry that holds adapters to another model shape")
            self.hidden_size, self.num_layers, self.device = hidden_size, num_layers, device
            for name, adapter in self._adapters.items():
                self._adapters[name] = self._place(adapter)

    def _place(self, adapter: HPRAdapter) -> HPRAdapter:
        return adapter.to(device=self.device, dtype=torch.float32).eval().requires_grad_(False)

    # ---- loading and unloading ------------------------------------------------------------------------------
    def add(self, name: str, adapter: HPRAdapter) -> HPRAdapter:
        """Validate ``adapter`` against the model's shape and make it routable as ``name``."""
        if not name:
            raise EditSpecError("an adapter needs a non-empty name", "name")
        if self.hidden_size is not None and self.num_layers is not None:
            adapter.check_compatible(self.hidden_size, self.num_layers)
        placed = self._place(adapter)
        with self._lock:
            if name in self._adapters:
                state = "still being unloaded" if name in self._unloading else "already loaded"
                raise AdapterConflictError(f"an adapter named {name!r} is {state}")
            self._adapters[name] = placed
        return placed

    def load(self, name: str, path: str | os.PathLike[str], defaults: AdapterDefaults | None = None) -> HPRAdapter:
        """Read the checkpoint at ``path`` (ours or the seed's), validate it and add it as ``name``; ``defaults``
        replace its default alpha, scope and edited tokens under this name (the files are not changed).

        Raises :class:`~hpr.errors.CheckpointError` naming the file for a bad checkpoint or default, and
        :class:`~hpr.errors.AdapterConflictError` when ``name`` is taken; nothing changes then.
        """
        with self._lock:  # fail before reading gigabytes when the name is taken
            if name in self._adapters:
                raise AdapterConflictError(f"an adapter named {name!r} is already loaded")
        adapter = HPRAdapter.load(path, name, self.hidden_size, self.num_layers)
        if defaults is not None and not defaults.empty:
            adapter.config = with_defaults(adapter.config, defaults, f"{path}: adapter {name!r}")
        return self.add(name, adapter)

    def unload(self, name: str) -> bool:
        """Stop routing requests to ``name``; drop it now if nothing runs on it (True), else on its last release.

        Raises :class:`UnknownAdapterError` if ``name`` is not loaded (or already being unloaded).
        """
        with self._lock:
            if name not in self._adapters or name in self._unloading:
                raise UnknownAdapterError(f"adapter {name!r} is not loaded", "name")
            if self._leases.get(name, 0) == 0:
                del self._adapters[name]
                return True
            self._unloading.add(name)
            return False

    # ---- requests -------------------------------------------------------------------------------------------
    def acquire(self, name: str) -> None:
        """A request starts using ``name``: it stays loaded until :meth:`release`. Refused if not routable."""
        with self._lock:
            if name not in self._adapters or name in self._unloading:
                raise UnknownAdapterError(f"adapter {name!r} is not loaded", "hpr.adapter")
            self._leases[name] = self._leases.get(name, 0) + 1

    def release(self, name: str) -> None:
        """A request that :meth:`acquire` d ``name`` is done; an unloading adapter goes with its last lease."""
        with self._lock:
            left = self._leases.get(name, 0) - 1
            if left > 0:
                self._leases[name] = left
                return
            self._leases.pop(name, None)
            if name in self._unloading:
                self._unloading.discard(name)
                self._adapters.pop(name, None)
                log.info("adapter %s unloaded (its last running request finished)", name)

    def running(self, name: str) -> int:
        """Requests holding ``name`` now."""
        return self._leases.get(name, 0)

    # ---- lookups --------------------------------------------------------------------------------------------
    def __contains__(self, name: object) -> bool:
        """Whether ``name`` is routable (loaded and not being unloaded)."""
        return name in self._adapters and name not in self._unloading

    def names(self) -> list[str]:
        """Routable adapter names, in load order."""
        return [name for name in list(self._adapters) if name not in self._unloading]

    def items(self) -> list[tuple[str, HPRAdapter]]:
        """Routable ``(name, adapter)`` pairs, in load order."""
        return [(name, self._adapters[name]) for name in self.names() if name in self._adapters]

    def get(self, name: str) -> HPRAdapter:
        """The adapter ``name``, routable or still finishing its running requests (the hooks' lookup)."""
        adapter = self._adapters.get(name)
        if adapter is None:
            raise UnknownAdapterError(f"adapter {name!r} is not loaded", "hpr.adapter")
        return adapter

    def resolve(
        self,
        adapter: str,
        layers: str | Sequence[int] | None = "selected",
        alpha: float | None = None,
        scope: Scope | None = None,
        tokens: EditTokens | None = None,
    ) -> EditSpec:
        """Validate a request's edit against the routable adapters and return the spec to put in a plan.

        ``alpha=None`` takes the adapter's ``default_alpha``, ``scope=None`` its ``default_scope`` and
        ``tokens=None`` its ``default_edit_tokens`` (the settings its evaluation chose); ``tokens="all"`` edits
        every generated token.
        """
        chosen = self._adapters.get(adapter)
        if chosen is None or adapter in self._unloading:
            raise UnknownAdapterError(
                f"adapter {adapter!r} is not loaded (loaded: {sorted(self.names())})", "hpr.adapter"
            )
        strength = chosen.config.default_alpha if alpha is None else alpha
        where: Any = chosen.config.default_scope if scope is None else scope
        limit = chosen.config.default_edit_tokens if tokens is None else None if tokens == "all" else tokens
        return EditSpec(adapter=adapter, layers=parse_layers(layers, chosen), alpha=strength, scope=where, tokens=limit)


def with_defaults(config: HPRConfig, defaults: AdapterDefaults, where: str) -> HPRConfig:
    """``config`` with ``defaults`` as its default alpha, scope and edited tokens (validated as the file's are)."""
    changes: dict[str, object] = {}
    if defaults.alpha is not None:
        changes["default_alpha"] = defaults.alpha
    if defaults.scope is not None:
        changes["default_scope"] = defaults.scope
    if defaults.tokens is not None:
        changes["default_edit_tokens"] = None if defaults.tokens == "all" else defaults.tokens
    try:
        return dataclasses.replace(config, **changes)  # type: ignore[arg-type]
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: {exc}") from exc
