"""schemathesis hooks for tests/server/test_fuzz.py (loaded through ``SCHEMATHESIS_HOOKS``).

Structured output and tool calls have rules no JSON Schema of the request can state: a ``json_schema.schema`` or a
tool's ``parameters`` must itself be a valid JSON Schema that llguidance compiles, a named ``tool_choice`` must name one
of the request's ``tools``, a tool call needs tools, and ``response_format`` and tools cannot both constrain one
answer. A schema-valid request that breaks one of them gets our documented 400 (docs/server.md, "Structured output
and tool calls"); that one refusal is not a failure. Nor is a prompt too long for the context when the request has
tools or past tool calls: their JSON goes into the prompt, and no schema bounds it in tokens (the fuzz server's
context is 1024). Every other check, and every other 400, still counts.
"""

from __future__ import annotations

from typing import Any

import schemathesis

STRUCTURED_PARAMS = ("response_format", "tools", "tool_choice")
STRUCTURED_CODES = ("invalid_schema", "invalid_value")


@schemathesis.hook
def filter_failure(context: Any, failure: Any, case: Any, response: Any) -> bool:
    """Keep a failure unless it is a schema-valid request refused for a structured-output rule (see above)."""
    if getattr(failure, "code", None) != "ST202" or response.status_code != 400:
        return True
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return True
    param = str(error.get("param") or "")
    if error.get("code") == "context_length_exceeded":
        return not _has_tool_json(case.body)
    return not (param.startswith(STRUCTURED_PARAMS) and error.get("code") in STRUCTURED_CODES)


def _has_tool_json(body: Any) -> bool:
    if not isinstance(body, dict):
        return False
    messages = body.get("messages") if isinstance(body.get("messages"), list) else []
    return bool(body.get("tools")) or any(isinstance(m, dict) and m.get("tool_calls") for m in messages)
