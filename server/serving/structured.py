"""``response_format`` → an :class:`OutputConstraint`, checked and compiled before any engine sees the request.

The schema is checked against its JSON Schema metaschema first (``jsonschema``), so a mistake is a 400 naming its
JSON path (``$.properties.age.type``); then compiled by xgrammar, the grammar library vLLM uses, in a worker
thread (never on the event loop nor the engine thread). Compiled grammars are kept by schema, so a schema seen
before costs a dictionary lookup. Output is compact JSON: no free whitespace between the grammar's tokens, so
a model cannot loop on blank space inside an object.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import OrderedDict
from typing import Any

from server.engine.types import ModelInfo, OutputConstraint
from server.errors import APIError
from server.protocol import ResponseFormatJSONObject, ResponseFormatJSONSchema, ResponseFormatText

ResponseFormatModel = ResponseFormatText | ResponseFormatJSONObject | ResponseFormatJSONSchema
SCHEMA_PARAM = "response_format.json_schema.schema"


class GrammarCompiler:
    """xgrammar's compiler for one model's tokenizer and vocabulary, made on first use, and the grammars it
    compiled, by schema (the last ``cache_size``; thread-safe)."""

    def __init__(self, info: ModelInfo, cache_size: int = 256) -> None:
        self.info = info
        self.cache_size = cache_size
        self._compiler: Any = None
        self._lock = threading.Lock()
        self._grammars: OrderedDict[tuple[str, str | None], Any] = OrderedDict()
        self.compiled = 0  # grammars compiled so far (cache misses)

    def _get(self) -> Any:
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                tokenizer_info = xgr.TokenizerInfo.from_huggingface(
                    self.info.tokenizer, vocab_size=self.info.vocab_size
                )
                self._compiler = xgr.GrammarCompiler(tokenizer_info, cache_enabled=True)
            return self._compiler

    def compile(self, kind: str, schema: str | None) -> tuple[str, Any]:
        """The grammar of ``json_object`` (any JSON object) or ``json_schema`` (``schema``, JSON text): its EBNF
        text and the compiled grammar."""
        key = (kind, schema)
        with self._lock:
            if key in self._grammars:
                self._grammars.move_to_end(key)
                cached: tuple[str, Any] = self._grammars[key]
                return cached
        compiler = self._get()
        ebnf = json_grammar(schema if kind == "json_schema" else None)
        grammar = (ebnf, compiler.compile_grammar(ebnf))
        with self._lock:
            self.compiled += 1
            self._grammars[key] = grammar
            while len(self._grammars) > self.cache_size:
                self._grammars.popitem(last=False)
        return grammar


# xgrammar 0.2.8 writes a string with maxLength/minLength as characters of [^"\\\r\n]: raw control characters
# (U+0000-U+001F), which JSON forbids in a string, pass (seen: "\x0c" in a city name under an edit, which pydantic
# then refused). Its unbounded strings exclude them. The bounded class gets the same exclusion here.
_BOUNDED_STRING_CHARACTER = r"[^\"\\\r\n]"
_JSON_STRING_CHARACTER = r"[^\0-\x1f\"\\]"


def json_grammar(schema: str | None) -> str:
    """The EBNF grammar of compact JSON matching ``schema`` (JSON text; None: any object), from xgrammar's
    converter, with JSON's rule on control characters in every string."""
    import xgrammar as xgr

    if schema is None:
        grammar = xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
    else:
        grammar = xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=True)
    return str(grammar).replace(_BOUNDED_STRING_CHARACTER, _JSON_STRING_CHARACTER)


def check_schema(schema: dict[str, Any], param: str = SCHEMA_PARAM) -> None:
    """A 400 naming the JSON path of the first error when ``schema`` is not a valid JSON Schema."""
    from jsonschema import SchemaError
    from jsonschema.validators import validator_for

    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        raise APIError(
            400, f"the JSON schema is invalid at {exc.json_path}: {exc.message}", param=param, code="invalid_schema"
        ) from exc


async def compile_constraint(
    compiler: GrammarCompiler, kind: str, schema: dict[str, Any] | None, param: str = SCHEMA_PARAM
) -> OutputConstraint:
    """Check ``schema`` and compile it off the event loop; a 400 (``param``) when the grammar library refuses it."""
    text = None
    if schema is not None:
        check_schema(schema, param)
        text = json.dumps(schema, sort_keys=True)
    try:
        ebnf, grammar = await asyncio.to_thread(compiler.compile, kind, text)
    except (RuntimeError, ValueError) as exc:  # xgrammar's messages carry a C++ source location: keep the reason
        reason = str(exc).strip().splitlines()[0].split(": ", 1)[-1] if str(exc).strip() else type(exc).__name__
        raise APIError(
            400, f"the JSON schema cannot be compiled: {reason}", param=param, code="invalid_schema"
        ) from exc
    if schema is None:
        return OutputConstraint(kind="json_object", ebnf=ebnf, grammar=grammar)
    return OutputConstraint(kind="json_schema", schema=text, ebnf=ebnf, grammar=grammar)


async def response_format_constraint(
    compiler: GrammarCompiler, response_format: ResponseFormatModel | None
) -> OutputConstraint | None:
    """The constraint of an OpenAI ``response_format`` (None for none or ``text``)."""
    if response_format is None or isinstance(response_format, ResponseFormatText):
        return None
    if isinstance(response_format, ResponseFormatJSONObject):
        return await compile_constraint(compiler, "json_object", None)
    schema = response_format.json_schema.schema_
    if schema is None:  # a name and no schema: any JSON object, as OpenAI then returns
        return await compile_constraint(compiler, "json_object", None)
    return await compile_constraint(compiler, "json_schema", schema)
