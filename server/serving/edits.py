"""Resolving a request's ``model`` + ``hpr`` fields into the edit the engine applies (and the one we report).

Precedence: ``model`` names the base model or an adapter; ``hpr.adapter`` names an adapter explicitly. Both may
be given only if they agree — ``model: "a"`` with ``hpr.adapter: "b"`` is a 400 on ``hpr.adapter`` rather than a
silent choice. ``model`` = an adapter id without ``hpr`` means that adapter's selected layers at its ``default_alpha``.
"""

from __future__ import annotations

from dataclasses import dataclass

from hpr.editing import EditSpec
from server.engine.types import LayerEditStats
from server.errors import APIError
from server.protocol import HPRApplied, HPRLayerStats, HPRRequest
from server.runtime import Runtime


@dataclass(frozen=True)
class ResolvedEdit:
    spec: EditSpec | None  # None = the base model, unedited
    applied: HPRApplied | None  # what the response reports
    return_stats: bool = False


NO_EDIT = ResolvedEdit(spec=None, applied=None)


def check_model(runtime: Runtime, model: str | None) -> str | None:
    """Return the adapter id ``model`` names (None for the base model); 404 for anything else."""
    if model is None or model == runtime.base_id:
        return None
    if model in runtime.adapters:
        return model
    known = [runtime.base_id, *sorted(runtime.adapters)]
    raise APIError(404, f"model {model!r} does not exist; available: {known}", param="model", code="model_not_found")


def resolve_edit(runtime: Runtime, model: str | None, hpr: HPRRequest | None) -> ResolvedEdit:
    """Validate the edit a request asks for. Core errors (bad layers, alpha, unknown adapter) propagate as-is."""
    model_adapter = check_model(runtime, model)
    if hpr is None:
        if model_adapter is None:
            return NO_EDIT
        hpr = HPRRequest()
    adapter = hpr.adapter
    if adapter is not None and model_adapter is not None and adapter != model_adapter:
        raise APIError(
            400,
            f"hpr.adapter {adapter!r} conflicts with model {model_adapter!r}: name the adapter in one place, "
            f"or use the base model id {runtime.base_id!r} as model",
            param="hpr.adapter",
            code="conflicting_adapter",
        )
    adapter = adapter or model_adapter
    if adapter is None:
        if hpr.layers == "none":
            return ResolvedEdit(spec=None, applied=None, return_stats=False)
        raise APIError(
            400,
            f"hpr needs an adapter: set hpr.adapter or use an adapter id as model (loaded: {sorted(runtime.adapters)})",
            param="hpr.adapter",
            code="missing_adapter",
        )
    spec = runtime.editor.resolve(adapter, hpr.layers, hpr.alpha, hpr.scope)
    applied = HPRApplied(adapter=spec.adapter, layers=list(spec.layers), alpha=spec.alpha, scope=spec.scope)
    return ResolvedEdit(spec=spec, applied=applied, return_stats=hpr.return_stats)


def stats_payload(stats: dict[int, LayerEditStats] | None) -> dict[str, HPRLayerStats] | None:
    """Engine stats → the response's ``hpr_stats`` (keys are layer indices as strings, JSON-style)."""
    if stats is None:
        return None
    return {
        str(layer): HPRLayerStats(
            tokens=s.tokens,
            rotated=s.rotated,
            share_rotated=s.rotated / s.tokens if s.tokens else 0.0,
            mean_angle=s.mean_angle,
        )
        for layer, s in sorted(stats.items())
    }
