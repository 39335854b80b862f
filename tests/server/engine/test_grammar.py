"""Constrained decoding in the hf engine (issue 30): rows with different grammars, and none, in one batch.

The tiny random model's free text is not JSON; under a grammar every answer parses and validates against its
schema (checked with ``jsonschema``, not with the grammar library), and a row's tokens are the same alone and in
a batch whatever its neighbours' grammars.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import jsonschema
import pytest

from hpr.editing import HPREditor
from hpr.model import LoadedModel
from server.engine.types import GenerationOutput, GenerationRequest, ModelInfo, OutputConstraint, SamplingParams
from server.serving.structured import GrammarCompiler, compile_constraint
from tests.server.engine.conftest import StepSizes, collect, joined, run

LETTERS = {"type": "object", "properties": {"word": {"enum": ["alpha", "beta", "gamma"]},
           "count": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["word", "count"],
           "additionalProperties": False}  # fmt: skip
SHORT = {"type": "object", "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 6},
         "ok": {"type": "boolean"}}, "required": ["name", "ok"], "additionalProperties": False}  # fmt: skip


@pytest.fixture(scope="module")
def compiler(tiny_loaded: LoadedModel) -> GrammarCompiler:
    return GrammarCompiler(ModelInfo.from_loaded(tiny_loaded))


def constraint(compiler: GrammarCompiler, schema: dict[str, Any]) -> OutputConstraint:
    return asyncio.run(compile_constraint(compiler, "json_schema", schema))


def request(rid: str, loaded: LoadedModel, text: str, c: OutputConstraint | None, **sampling: Any) -> GenerationRequest:
    params = SamplingParams(max_tokens=60, temperature=sampling.pop("temperature", 0.0), **sampling)
    return GenerationRequest(rid, loaded.tokenizer.encode(text), params, constraint=c)


def test_rows_with_different_grammars_and_none_share_a_batch(
    tiny_loaded: LoadedModel, tiny_editor: HPREditor, compiler: GrammarCompiler, make_engine: Any
) -> None:
    letters, short = constraint(compiler, LETTERS), constraint(compiler, SHORT)
    edit = tiny_editor.resolve("tiny", "all", alpha=2.0)
    requests = [
        request("free", tiny_loaded, "Hello there", None),
        request("letters", tiny_loaded, "Count:", letters),
        request("short", tiny_loaded, "Name?", short, temperature=1.0, seed=7),
        request("edited", tiny_loaded, "Name again?", short),
    ]
    requests[3].edit = edit
    steps = StepSizes()

    async def main() -> tuple[list[list[GenerationOutput]], list[list[GenerationOutput]]]:
        async with make_engine(max_batch_size=8, observer=steps) as engine:
            together = list(await asyncio.gather(*(collect(engine, r) for r in requests)))
            alone = [await collect(engine, r) for r in requests]
            return together, alone

    together, alone = run(main())
    assert max(steps.sizes) == 4  # the four shared a forward
    for got, want in zip(together, alone, strict=True):
        assert joined(got)[0] == joined(want)[0]  # the same tokens alone and in the mixed batch
    free_text = joined(together[0])[1]
    with pytest.raises(ValueError):
        json.loads(free_text)  # unconstrained, the random model writes no JSON
    for outputs, schema in zip(together[1:], (LETTERS, SHORT, SHORT), strict=True):
        text = joined(outputs)[1]
        jsonschema.validate(json.loads(text), schema)
        assert outputs[-1].finish_reason == "stop"
        assert json.dumps(json.loads(text), separators=(", ", ": ")) == text  # compact: no free whitespace


def test_a_grammar_row_stops_when_its_json_is_complete_even_with_ignore_eos(
    tiny_loaded: LoadedModel, compiler: GrammarCompiler, make_engine: Any
) -> None:
    letters = constraint(compiler, LETTERS)

    async def main() -> list[GenerationOutput]:
        async with make_engine() as engine:
            return await collect(engine, request("r", tiny_loaded, "Count:", letters, ignore_eos=True))

    outputs = run(main())
    jsonschema.validate(json.loads(joined(outputs)[1]), LETTERS)
    assert outputs[-1].finish_reason == "stop" and outputs[-1].completion_tokens < 60


def test_compiled_grammars_are_kept_by_schema(tiny_loaded: LoadedModel) -> None:
    compiler = GrammarCompiler(ModelInfo.from_loaded(tiny_loaded), cache_size=2)
    first = constraint(compiler, LETTERS)
    assert constraint(compiler, LETTERS).grammar is first.grammar and compiler.compiled == 1
    constraint(compiler, SHORT)
    asyncio.run(compile_constraint(compiler, "json_object", None))  # a third: LETTERS, the oldest, is dropped
    assert constraint(compiler, LETTERS).grammar is not first.grammar and compiler.compiled == 4


def takes(compiler: GrammarCompiler, schema: dict[str, Any], text: str) -> bool:
    """Whether the schema's grammar takes ``text`` as (the start of) an answer."""
    ids = compiler.info.tokenizer.encode(text, add_special_tokens=False)
    return bool(constraint(compiler, schema).grammar.deep_copy().try_consume_tokens(ids) == len(ids))


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        ('{"name": "abcdef", "ok": true}', True),
        ('{"name": "abcdefg", "ok": true}', False),  # maxLength 6
        ('{"name": "", "ok": true}', False),  # minLength 1
        ('{"name": "ab\n", "ok": true}', False),  # a raw control character: JSON forbids it (xgrammar 0.2.8 took it)
        ('{"name": "ab\\n", "ok": true}', True),  # the escaped one is fine
        ('{"name": "ab", "ok": true, "more": 1}', False),  # a property the schema does not name
        ('{"name":"ab", "ok": true}', False),  # compact JSON: ": " and ", " only
        ('{"name": "ab",  "ok": true}', False),
    ],
)
def test_the_grammar_takes_what_the_schema_and_compact_json_take(
    compiler: GrammarCompiler, text: str, valid: bool
) -> None:
    """The grammar against an independent judge: ``jsonschema`` for the schema, json.dumps for the layout."""
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        judged = False
    else:
        judged = jsonschema.Draft202012Validator(SHORT).is_valid(parsed) and json.dumps(parsed) == text
    assert judged is valid  # the table is right
    assert takes(compiler, SHORT, text) is valid


def test_objects_without_additional_properties_are_closed(compiler: GrammarCompiler) -> None:
    """As OpenAI's strict mode has them: a schema that says nothing of other properties takes none, at any depth;
    one that allows them takes them."""
    inner = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    nested = {"type": "object", "properties": {"properties": inner}, "required": ["properties"]}
    assert takes(compiler, nested, '{"properties": {"a": 1}}')
    assert not takes(compiler, nested, '{"properties": {"a": 1, "b"')
    assert not takes(compiler, nested, '{"properties": {"a": 1}, "b"')
    assert takes(compiler, {**inner, "additionalProperties": True}, '{"a": 1, "b": 2}')


def test_a_temperature_too_small_for_float32_samples_greedily(
    tiny_loaded: LoadedModel, compiler: GrammarCompiler, make_engine: Any
) -> None:
    """Found by the fuzz test: temperature 1e-300 is 0 in float32, and dividing by it drew a token from NaN
    probabilities, one the grammar had masked. Below 1e-5 a request is greedy, as in vLLM."""
    letters = constraint(compiler, LETTERS)

    async def main() -> list[list[GenerationOutput]]:
        async with make_engine() as engine:
            return [
                await collect(engine, request(f"t{t}", tiny_loaded, "Count:", c, temperature=t, seed=3))
                for t in (1e-300, 0.0)
                for c in (letters, None)
            ]

    tiny, tiny_free, greedy_json, greedy_free = (joined(o) for o in run(main()))
    assert tiny == greedy_json and tiny_free == greedy_free
    jsonschema.validate(json.loads(tiny[1]), LETTERS)


def test_top_logprobs_list_only_tokens_the_grammar_allows(
    tiny_loaded: LoadedModel, compiler: GrammarCompiler, make_engine: Any
) -> None:
    """Found by the fuzz test: asking for 20 alternatives where the grammar allows fewer listed -inf ones, which
    JSON cannot carry (a 500)."""
    letters = constraint(compiler, LETTERS)

    async def main() -> list[GenerationOutput]:
        async with make_engine() as engine:
            return await collect(engine, request("lp", tiny_loaded, "Count:", letters, logprobs=20))

    values = [lp for o in run(main()) for lp in (o.logprobs or [])]
    assert values[0].top and len(values[0].top) < 20  # '{' is the only token allowed first
    assert all(v > float("-inf") for lp in values for _, _, v in lp.top)
    assert all(lp.logprob > float("-inf") for lp in values)


def test_the_compile_runs_off_the_calling_thread(tiny_loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """The serving layer awaits the compile in a worker thread: the event loop (and the engine) never waits on it."""
    import threading

    compiler = GrammarCompiler(ModelInfo.from_loaded(tiny_loaded))
    threads: list[int] = []
    real = compiler.compile

    def recording(kind: str, schema: str | None) -> Any:
        threads.append(threading.get_ident())
        return real(kind, schema)

    monkeypatch.setattr(compiler, "compile", recording)
    constraint(compiler, SHORT)
    assert threads and threads[0] != threading.get_ident()


def test_a_tokenizer_llguidance_cannot_read_is_a_clear_400(tiny_loaded: LoadedModel) -> None:
    """Structured output needs the tokens as bytes; a tokenizer that does not say how (a bare Fuse decoder) gets a
    400 that says so, not a 500 nor a schema error."""
    import dataclasses

    from tokenizers import decoders

    from server.errors import APIError
    from tests.server.conftest import make_tiny_tokenizer

    opaque = make_tiny_tokenizer()
    opaque.backend_tokenizer.decoder = decoders.Fuse()
    info = dataclasses.replace(ModelInfo.from_loaded(tiny_loaded), tokenizer=opaque)
    with pytest.raises(APIError) as caught:
        constraint(GrammarCompiler(info), SHORT)
    assert caught.value.status == 400 and caught.value.code == "structured_output_unsupported"
    assert "llguidance cannot read its tokenizer" in str(caught.value)
    assert constraint(GrammarCompiler(ModelInfo.from_loaded(tiny_loaded)), SHORT).grammar is not None


def test_properties_come_in_the_schemas_order(compiler: GrammarCompiler) -> None:
    """As OpenAI's strict mode writes them: in the order the client's schema lists them (not sorted by name)."""
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "integer"}},
              "required": ["b", "a"]}  # fmt: skip
    assert takes(compiler, schema, '{"b": 1, "a": 2}')
    assert not takes(compiler, schema, '{"a": 2')
