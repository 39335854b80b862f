"""Resolving a request's ``model`` + ``hpr`` fields into the edit the engine applies (and the one we report).

Precedence: ``model`` names the base model or an adapter; ``hpr.adapter`` names an adapter explicitly. Both may
be given only if they agree — ``model: "a"`` with ``hpr.adapter: "b"`` is a 400 on ``hpr.adapter`` rather than a
silent choice. ``model`` = an adapter id without ``hpr`` means that adapter's selected layers at its ``default_alpha``.
"""

from __future__ import annotations

from dataclasses import dataclass

from hpr.edit_spec import EditSpec
from hpr.edit_stats import EditStats
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
    if model in runtime.registry:
        return model
    known = [runtime.base_id, *sorted(runtime.registry.names())]
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
            "hpr needs an adapter: set hpr.adapter or use an adapter id as model "
            f"(loaded: {sorted(runtime.registry.names())})",
            param="hpr.adapter",
            code="missing_adapter",
        )
    spec = runtime.registry.resolve(adapter, hpr.layers, hpr.alpha, hpr.scope, hpr.edit_tokens)
    applied = HPRApplied(
        adapter=spec.adapter,
        layers=list(spec.layers),
        alpha=spec.alpha,
        scope=spec.scope,
        edit_tokens="all" if spec.tokens is None else spec.tokens,
    )
    return ResolvedEdit(spec=spec, applied=applied, return_stats=hpr.return_stats)


def stats_payload(stats: EditStats | None) -> dict[str, HPRLayerStats] | None:
    """The request's :class:`EditStats` → the response's ``hpr_stats`` (keys are layer indices as strings).

    The API keeps HPR's words: ``rotated`` is the positions the method changed, ``mean_angle`` their mean amount.
    """
    if stats is None:
        return None
    return {
        str(layer): HPRLayerStats(
            tokens=s.tokens, rotated=s.changed, share_rotated=s.share_changed, mean_angle=s.mean_amount
        )
        for layer, s in sorted(stats.layers.items())
    }
