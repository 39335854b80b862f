"""``response_format`` → an :class:`OutputConstraint`, checked and compiled before any engine sees the request.

The schema is checked against its JSON Schema metaschema first (``jsonschema``), so a mistake is a 400 naming its
JSON path (``$.properties.age.type``); then made into a grammar by llguidance (vLLM's ``guidance`` backend) and
checked against the model's tokenizer, in a worker thread (never on the event loop nor the engine thread). Grammars
are kept by schema, so a schema seen before costs a dictionary lookup.

Both backends constrain with the same grammar: the schema handed to llguidance (``OutputConstraint.grammar_schema``)
carries its options inside it (``x-guidance``), so vLLM's guidance backend builds exactly the grammar the hf engine
does. Output is compact JSON: ``", "`` and ``": "`` between items, no other whitespace, so a model cannot loop on
blank space inside an object. Objects are closed (``additionalProperties: false`` where the schema says nothing),
as OpenAI's strict mode has them.

Why llguidance and not xgrammar (vLLM's default): a string with ``maxLength`` costs xgrammar 0.2.8 about 0.8-1.3 ms
of CPU per token and row to mask, and llguidance 0.1 ms (``bench/grammar_fill.py``). At 32 rows that made the vllm
backend's constrained streams 15-26 % slower than free ones (docs/benchmarks.md, "Structured output").
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
from collections import OrderedDict
from typing import Any

from server.engine.types import ModelInfo, OutputConstraint
from server.errors import APIError
from server.protocol import ResponseFormatJSONObject, ResponseFormatJSONSchema, ResponseFormatText

ResponseFormatModel = ResponseFormatText | ResponseFormatJSONObject | ResponseFormatJSONSchema
SCHEMA_PARAM = "response_format.json_schema.schema"
ANY_OBJECT: dict[str, Any] = {"type": "object"}
# llguidance's JSON options, carried inside the schema so that every backend reads the same ones
GRAMMAR_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class UnsupportedTokenizerError(Exception):
    """The grammar library cannot map the model's tokens to bytes: no request can be constrained."""


class GrammarCompiler:
    """llguidance's tokenizer for one model (made on first use: about a second) and the grammars made for it, by
    schema (the last ``cache_size``; thread-safe)."""

    def __init__(self, info: ModelInfo, cache_size: int = 256) -> None:
        self.info = info
        self.cache_size = cache_size
        self._tokenizer: Any = None
        self._lock = threading.Lock()
        self._grammars: OrderedDict[tuple[str, str | None], tuple[str, Any]] = OrderedDict()
        self.compiled = 0  # grammars made so far (cache misses)

    def tokenizer(self) -> Any:
        """llguidance's view of the model's tokenizer, over the model's whole vocabulary."""
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf

                try:
                    self._tokenizer = llguidance.hf.from_tokenizer(self.info.tokenizer, n_vocab=self.info.vocab_size)
                except Exception as exc:  # it reads fast tokenizers with byte-level or byte-fallback pieces only
                    raise UnsupportedTokenizerError(
                        f"structured output is not available for this model: llguidance cannot read its tokenizer "
                        f"({exc})"
                    ) from exc
            return self._tokenizer

    def compile(self, kind: str, schema: str | None) -> tuple[str, Any]:
        """The grammar of ``json_object`` (any JSON object) or ``json_schema`` (``schema``, JSON text): the schema
        llguidance builds it from (JSON text, options inside) and a matcher at its start, which requests copy.
        A ``ValueError`` with llguidance's reason when the schema cannot be made into a grammar."""
        key = (kind, schema)
        with self._lock:
            if key in self._grammars:
                self._grammars.move_to_end(key)
                return self._grammars[key]
        import llguidance

        grammar_schema = json.dumps(grammar_schema_of(None if schema is None else json.loads(schema)))
        grammar = llguidance.LLMatcher.grammar_from_json_schema(grammar_schema)
        tokenizer = self.tokenizer()
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if failed:
            raise ValueError(messages[0] if messages else "llguidance refused the grammar")
        compiled = (grammar_schema, llguidance.LLMatcher(tokenizer, grammar))
        with self._lock:
            self.compiled += 1
            self._grammars[key] = compiled
            while len(self._grammars) > self.cache_size:
                self._grammars.popitem(last=False)
        return compiled


def grammar_schema_of(schema: dict[str, Any] | None) -> dict[str, Any]:
    """The schema llguidance builds the grammar from: ``schema`` (None: any JSON object) with its objects closed
    and the JSON options inside it (``x-guidance``)."""
    if schema is None:
        return {**ANY_OBJECT, "x-guidance": GRAMMAR_OPTIONS}
    closed = copy.deepcopy(schema)
    _close_objects(closed)
    return {**closed, "x-guidance": GRAMMAR_OPTIONS}


_SCHEMA_MAPS = ("properties", "patternProperties", "dependentSchemas", "$defs", "definitions")  # name → schema
_VALUES = ("const", "enum", "default", "examples", "required")  # JSON values, not schemas


def _close_objects(node: Any) -> None:
    """``additionalProperties: false`` on every object schema with ``properties`` that says nothing of others."""
    if isinstance(node, list):
        for item in node:
            _close_objects(item)
        return
    if not isinstance(node, dict):
        return
    others = ("additionalProperties", "patternProperties", "unevaluatedProperties")
    if isinstance(node.get("properties"), dict) and not any(key in node for key in others):
        node["additionalProperties"] = False
    for key, value in node.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            for schema in value.values():
                _close_objects(schema)
        elif key not in _VALUES:
            _close_objects(value)


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
        text = json.dumps(schema)  # in the client's order: the answer's properties come in the schema's order
    try:
        grammar_schema, grammar = await asyncio.to_thread(compiler.compile, kind, text)
    except UnsupportedTokenizerError as exc:
        raise APIError(400, str(exc), param=param.split(".")[0], code="structured_output_unsupported") from exc
    except (RuntimeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise APIError(
            400, f"the JSON schema cannot be compiled: {reason}", param=param, code="invalid_schema"
        ) from exc
    if schema is None:
        return OutputConstraint(kind="json_object", grammar_schema=grammar_schema, grammar=grammar)
    return OutputConstraint(kind="json_schema", schema=text, grammar_schema=grammar_schema, grammar=grammar)


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
