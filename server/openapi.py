"""The published OpenAPI schema, completed with what the loaded model and adapters allow.

Token ids must be below the vocabulary size and layer indices below the layer count; the request models only know
they are non-negative and mark such fields with ``x-hpr-bound``. Once the model is loaded, ``/openapi.json`` states
the real bounds (``maximum``, or a ``pattern`` for token ids written as JSON object keys and for layer specs) and
which ``model`` / ``hpr.adapter`` combinations name an edit, so a client — or a fuzzer — can tell from the schema
alone which requests the server accepts.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

BOUND_KEY = "x-hpr-bound"


def int_range_pattern(upper: int) -> str:
    """A regex matching the decimal integers 0..``upper`` (no leading zeros, no sign)."""
    return f"^{_int_range(upper)}$"


def layer_spec_pattern(num_layers: int) -> str:
    """``selected``, ``all``, ``none`` or a list of layers and ranges (``"1-2,3"``) within the model."""
    n = _int_range(num_layers - 1)
    return rf"^\s*(selected|all|none|{n}(\s*-\s*{n})?(\s*,\s*{n}(\s*-\s*{n})?)*)\s*$"


def _int_range(upper: int) -> str:
    if upper < 0:
        raise ValueError("upper must be ≥ 0")
    digits = str(upper)
    k = len(digits)
    if k == 1:
        return f"[0-{digits}]"
    alternatives = ["[0-9]"] + [f"[1-9][0-9]{{{n - 1}}}" for n in range(2, k)]
    for i, d in enumerate(digits):  # k-digit numbers that first fall below `upper` at position i
        lo, hi = (1 if i == 0 else 0), int(d) - 1
        if lo <= hi:
            rest = k - i - 1
            alternatives.append(f"{digits[:i]}[{lo}-{hi}]" + (f"[0-9]{{{rest}}}" if rest else ""))
    alternatives.append(digits)
    return "(" + "|".join(alternatives) + ")"


def _apply_bounds(node: Any, bounds: dict[str, int]) -> None:
    """Replace every ``x-hpr-bound`` marker by the bound it names (exclusive upper limit)."""
    if isinstance(node, dict):
        name = node.pop(BOUND_KEY, None)
        if name == "layer-spec" and "layers" in bounds:
            node["pattern"] = layer_spec_pattern(bounds["layers"])
        elif name in bounds:
            if "pattern" in node:  # a token id spelled as a string (logit_bias keys)
                node["pattern"] = int_range_pattern(bounds[name] - 1)
            else:
                node["maximum"] = bounds[name] - 1
        for value in node.values():
            _apply_bounds(value, bounds)
    elif isinstance(node, list):
        for item in node:
            _apply_bounds(item, bounds)


def _with_edit_rule(components: dict[str, Any], request: str, base_id: str, adapters: list[str]) -> None:
    """Which ``model`` / ``hpr`` combinations make an edit (docs/server.md, "Which edit applies"), as JSON Schema.

    ``model`` = an adapter id: ``hpr.adapter`` is absent or the same id. ``model`` = the base id or absent: an
    ``hpr`` object names its adapter, or asks for ``layers: "none"``. Any other ``model`` is a 404. Written as
    ``anyOf`` whole request variants (no ``allOf``), which generators such as schemathesis' handle well.
    """
    base = components[request]
    hpr = components["HPRRequest"]

    def hpr_variant(suffix: str, adapter: dict[str, Any] | None = None, none_layers: bool = False) -> dict[str, Any]:
        name = f"HPRRequest{suffix}"
        variant = copy.deepcopy(hpr)
        if adapter is not None:
            variant["properties"]["adapter"] = adapter
            variant["required"] = ["adapter"] if "type" in adapter else variant.get("required", [])
        if none_layers:
            variant["properties"]["layers"] = {"const": "none"}
            variant["required"] = ["layers"]
        components[name] = variant
        return {"anyOf": [{"$ref": f"#/components/schemas/{name}"}, {"type": "null"}]}

    variants = []
    for i, name in enumerate(adapters):
        variant = copy.deepcopy(base)
        variant["properties"]["model"] = {"const": name}
        variant["properties"]["hpr"] = hpr_variant(f"For{i}", {"anyOf": [{"const": name}, {"type": "null"}]})
        variant["required"] = sorted({*variant.get("required", []), "model"})
        variants.append(variant)
    for hpr_schema in (
        hpr_variant("Named", {"type": "string", "minLength": 1}),
        hpr_variant("NoLayers", none_layers=True),
    ):
        variant = copy.deepcopy(base)
        variant["properties"]["model"] = {"anyOf": [{"const": base_id}, {"type": "null"}]}
        variant["properties"]["hpr"] = hpr_schema
        variants.append(variant)
    components[request] = {"anyOf": variants, "title": base.get("title", request)}


def _add_stream_events(schema: dict[str, Any]) -> None:
    """``stream: true`` answers with server-sent events; each event's ``data`` is a chunk (JSON), one error frame
    (``{"error": ...}``), or ``[DONE]``. The schema describes the event, as schemathesis and OpenAPI 3.2 read it."""
    for path, chunk in (("/v1/chat/completions", "ChatCompletionChunk"), ("/v1/completions", "CompletionChunk")):
        content = schema["paths"][path]["post"]["responses"]["200"]["content"]
        content["text/event-stream"] = {
            "schema": {
                "type": "object",
                "properties": {
                    "data": {
                        "type": "string",
                        "description": f"A {chunk} as JSON, an error envelope as JSON, or [DONE] (the last event).",
                    }
                },
                "required": ["data"],
            }
        }


def install_openapi(app: FastAPI) -> None:
    """Serve the schema with the loaded model's bounds (markers stripped while the model is still loading)."""
    cache: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        runtime = getattr(app.state, "runtime", None)
        # The edit rule names the adapters: a schema cached before an adapter was loaded or unloaded is stale.
        adapters = sorted(runtime.registry.names()) if runtime is not None else []
        if cache.get("adapters") == adapters and "schema" in cache:
            return dict(cache["schema"])
        base = get_openapi(
            title=app.title, version=app.version, summary=app.summary, description=app.description, routes=app.routes
        )
        bounds: dict[str, int] = {}
        if runtime is not None:
            bounds = {"vocab": runtime.vocab_size, "layers": runtime.info.num_layers}
        schema = copy.deepcopy(base)
        _apply_bounds(schema, bounds)
        if runtime is not None:
            components = schema.get("components", {}).get("schemas", {})
            for name in ("ChatCompletionRequest", "CompletionRequest"):
                if name in components and "HPRRequest" in components:
                    _with_edit_rule(components, name, runtime.base_id, adapters)
            _add_stream_events(schema)
            cache.update(schema=schema, adapters=adapters)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
