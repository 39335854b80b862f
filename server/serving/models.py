"""``GET /v1/models``: the base model, then every adapter (``parent`` = the base model's id)."""

from __future__ import annotations

from pathlib import Path

from hpr.checkpoint import HPRAdapter
from server.errors import APIError
from server.protocol import ModelCard, ModelList
from server.runtime import Runtime


def adapter_info(adapter: HPRAdapter) -> dict[str, object]:
    config = adapter.config
    return {
        "method": config.method,
        "base_model": config.base_model,
        "trained_layers": list(config.layers),
        "selected_layers": list(config.selected_layers),
        "probe_accuracy": {str(layer): acc for layer, acc in sorted(config.probe_accuracy.items())},
        "default_alpha": config.default_alpha,
        "default_scope": config.default_scope,
        "default_edit_tokens": "all" if config.default_edit_tokens is None else config.default_edit_tokens,
        "format": "seed" if config.training.get("source_format") == "seed" else "hpr",
    }


def public_root(source: str | Path) -> str:
    """What ``root`` shows: a directory's name, never its absolute path (which tells a client about the host)."""
    path = Path(source)
    return path.name if path.is_absolute() or path.exists() else str(source)


def list_models(runtime: Runtime) -> ModelList:
    base = ModelCard(
        id=runtime.base_id,
        created=runtime.created,
        root=public_root(runtime.info.source),
        max_model_len=runtime.max_model_len,
    )
    cards = [base]
    for name, adapter in runtime.registry.items():
        source = adapter.source
        cards.append(
            ModelCard(
                id=name,
                created=runtime.created,
                root=public_root(source) if source is not None else None,
                parent=runtime.base_id,
                max_model_len=runtime.max_model_len,
                hpr=adapter_info(adapter),
            )
        )
    return ModelList(data=cards)


def get_model(runtime: Runtime, model_id: str) -> ModelCard:
    """One card of :func:`list_models` (``GET /v1/models/{id}``); 404 ``model_not_found`` otherwise."""
    for card in list_models(runtime).data:
        if card.id == model_id:
            return card
    raise APIError(404, f"model {model_id!r} does not exist", param="model", code="model_not_found")
