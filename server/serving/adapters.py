"""Adapters at run time: ``POST /v1/adapters`` loads one from under ``--adapter-root``, ``DELETE`` unloads one.

Loading reads and validates the checkpoint in a worker thread, so the event loop keeps serving and the engine
keeps decoding meanwhile; the adapter becomes routable only once it is complete. Unloading stops routing at
once and leaves the memory to the registry, which drops the adapter when its last running request finishes.
"""

from __future__ import annotations

from pathlib import Path

from hpr.edit_spec import AdapterDefaults
from server.errors import APIError
from server.protocol import AdapterDeleted, AdapterLoadRequest, ModelCard
from server.runtime import Runtime, in_own_thread
from server.serving.models import get_model


def path_inside_root(root: Path, path: str) -> Path:
    """``path`` (relative to ``root``, or absolute) with symlinks resolved; 400 unless it lies inside ``root``."""
    base = root.expanduser().resolve()
    candidate = Path(path).expanduser()
    resolved = (candidate if candidate.is_absolute() else base / candidate).resolve()
    if resolved != base and not resolved.is_relative_to(base):
        raise APIError(
            400,
            f"path {path!r} is outside the adapter root: only directories inside --adapter-root can be loaded",
            param="path",
            code="path_outside_root",
        )
    return resolved


async def load_adapter(runtime: Runtime, root: Path, body: AdapterLoadRequest) -> ModelCard:
    """Load, validate and route the adapter; its card as ``/v1/models/{name}`` shows it."""
    path = path_inside_root(root, body.path)
    defaults = AdapterDefaults(alpha=body.alpha, scope=body.scope, tokens=body.edit_tokens)
    await in_own_thread(runtime.load_adapter, body.name, path, defaults)  # not to_thread: see in_own_thread
    return get_model(runtime, body.name)


def unload_adapter(runtime: Runtime, name: str) -> AdapterDeleted:
    running = runtime.unload_adapter(name)
    return AdapterDeleted(id=name, deleted=True, running_requests=running)
