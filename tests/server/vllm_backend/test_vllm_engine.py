"""The vllm backend on tiny models of four families: the same tokens as the hf backend, edited or not, in mixed
batches and alone, with chunked prefill; the same statistics; a prefix cache that never crosses edits.

Each family's vLLM engine runs eagerly (``enforce_eager``: no compile wait per family); test_vllm_compiled.py covers
vLLM's default compiled mode. Prompts of 90 tokens are prefilled in two chunks (``max_num_batched_tokens=64``), so
scope ``generated`` and ``edit_tokens`` are applied by position across steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpr.edit_spec import EditSpec
from server.engine.types import GenerationOutput, GenerationRequest, SamplingParams
from tests.server.vllm_backend.conftest import TEST_VLLM_ARGS, Backend, require_vllm, started_backend
from tests.server.vllm_backend.families import FAMILIES, LAYERS, save_family_model

ALL = tuple(range(LAYERS))
EDITS: list[EditSpec | None] = [
    None,
    EditSpec("hpr", ALL, alpha=1.0, scope="all"),
    EditSpec("hpr", (1, 3), alpha=2.0, scope="generated", tokens=2),
    EditSpec("other", (0, 2), alpha=0.5, scope="generated"),
    EditSpec("steer", ALL, alpha=1.0, scope="all"),
]
PROMPT_LENGTHS = (5, 23, 90)  # 90 > max_num_batched_tokens: a chunked prefill


def prompt(length: int, seed: int) -> list[int]:
    """Printable-character token ids of the tiny tokenizer (6-100), deterministic."""
    return [6 + (seed * 31 + i * 17) % 95 for i in range(length)]


def requests(tag: str, max_tokens: int = 8, stats: bool = True) -> list[GenerationRequest]:
    out = []
    for e, edit in enumerate(EDITS):
        for p, length in enumerate(PROMPT_LENGTHS):
            out.append(
                GenerationRequest(
                    request_id=f"{tag}-{e}-{p}",
                    prompt_ids=prompt(length, seed=p),
                    sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=1),
                    edit=edit,
                    return_stats=stats and edit is not None,
                )
            )
    return out


def tokens(outputs: list[GenerationOutput]) -> list[int]:
    return [t for o in outputs for t in o.token_ids]


def logprobs(outputs: list[GenerationOutput]) -> list[float]:
    return [lp.logprob for o in outputs for lp in (o.logprobs or [])]


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_vllm()
    family: str = request.param
    return save_family_model(tmp_path_factory.mktemp(family) / family, family)


@pytest.fixture(scope="module")
def vllm_backend(family_dir: Path) -> Iterator[Backend]:
    with started_backend(family_dir, "vllm", [*TEST_VLLM_ARGS, "enforce_eager=true"]) as backend:
        yield backend


def test_mixed_batch_equals_the_hf_backend_and_each_request_alone(
    vllm_backend: Backend, hf_backends: dict[Path, Backend], family_dir: Path
) -> None:
    batch = requests("batch")
    in_batch = vllm_backend.generate(batch)
    alone = vllm_backend.alone(requests("alone"))
    reference = hf_backends[family_dir].alone(requests("hf"))
    for request, got, solo, ref in zip(batch, in_batch, alone, reference, strict=True):
        where = f"{request.request_id} {request.edit}"
        assert tokens(got) == tokens(solo), f"batched vs alone: {where}"
        assert tokens(got) == tokens(ref), f"vllm vs hf: {where}"
        assert len(tokens(got)) == 8
        for a, b in zip(logprobs(got), logprobs(ref), strict=True):
            assert math.isclose(a, b, abs_tol=2e-3), f"logprob {a} vs {b}: {where}"
    # The edits are visible: every edited configuration changes some request's tokens or logprobs.
    base = {r.request_id.split("-")[2]: logprobs(o) for r, o in zip(batch, in_batch, strict=True) if r.edit is None}
    for request, got in zip(batch, in_batch, strict=True):
        if request.edit is not None and request.edit.scope == "all":
            assert logprobs(got) != base[request.request_id.split("-")[2]], request.request_id


def test_edit_statistics_equal_the_hf_backend(
    vllm_backend: Backend, hf_backends: dict[Path, Backend], family_dir: Path
) -> None:
    got = vllm_backend.generate(requests("stats-v"))
    ref = hf_backends[family_dir].alone(requests("stats-h"))
    checked = 0
    for request, mine, theirs in zip(requests("x"), got, ref, strict=True):
        if request.edit is None:
            assert mine[-1].edit_stats is None
            continue
        a, b = mine[-1].edit_stats, theirs[-1].edit_stats
        assert a is not None and b is not None
        assert sorted(a.layers) == sorted(b.layers) == sorted(request.edit.layers)
        for layer in a.layers:
            x, y = a.layers[layer], b.layers[layer]
            assert (x.tokens, x.changed) == (y.tokens, y.changed), f"{request.request_id} layer {layer}"
            assert math.isclose(x.amount_sum, y.amount_sum, rel_tol=1e-3, abs_tol=1e-3)
            checked += x.tokens
    assert checked > 0


def test_scope_generated_counts_the_last_prompt_token_and_the_limited_generated_ones(vllm_backend: Backend) -> None:
    """Independent of the hf backend: the count follows from the scope rule alone. Scope generated with
    edit_tokens 2 edits the last prompt token and the first generated token's forward: 2 tokens per layer, even for
    the 90-token prompt prefilled over two steps."""
    spec = EditSpec("hpr", (1, 3), alpha=2.0, scope="generated", tokens=2)
    for length in PROMPT_LENGTHS:
        request = GenerationRequest(
            request_id=f"count-{length}",
            prompt_ids=prompt(length, seed=7),
            sampling=SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
            edit=spec,
            return_stats=True,
        )
        (outputs,) = vllm_backend.generate([request])
        stats = outputs[-1].edit_stats
        assert stats is not None
        assert {layer: s.tokens for layer, s in stats.layers.items()} == {1: 2, 3: 2}
    spec_all = EditSpec("hpr", (0,), alpha=1.0, scope="all")
    request = GenerationRequest(
        request_id="count-all",
        prompt_ids=prompt(90, seed=8),
        sampling=SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
        edit=spec_all,
        return_stats=True,
    )
    (outputs,) = vllm_backend.generate([request])
    stats = outputs[-1].edit_stats
    assert stats is not None and stats.layers[0].tokens == 90 + 5  # every prompt position, then 5 decode inputs


def test_prefix_cache_never_serves_a_prefix_computed_under_another_edit(
    vllm_backend: Backend, hf_backends: dict[Path, Backend], family_dir: Path
) -> None:
    """The same long prompt under no edit, edit A, edit B, then each again: a cached prefix is reused only by the
    same edit (A's second run hits A's blocks, never the unedited ones), and every run equals a cold one."""
    if family_dir.name != "llama":
        pytest.skip("one family is enough: the cache key is the engine's, not the model's")
    block = int(vllm_backend.engine.llm.vllm_config.cache_config.block_size)
    ids = prompt(2 * block + 3, seed=11)
    edits = {"none": None, "A": EditSpec("hpr", ALL, alpha=1.0, scope="all"), "B": EditSpec("other", ALL, alpha=2.0)}

    def one(tag: str, edit: EditSpec | None) -> GenerationRequest:
        sampling = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=1)
        return GenerationRequest(request_id=tag, prompt_ids=ids, sampling=sampling, edit=edit)

    first = {name: vllm_backend.generate([one(f"pc1-{name}", e)])[0] for name, e in edits.items()}
    second = {name: vllm_backend.generate([one(f"pc2-{name}", e)])[0] for name, e in edits.items()}
    cold = {name: hf_backends[family_dir].generate([one(f"pc-hf-{name}", e)])[0] for name, e in edits.items()}
    assert first["none"][-1].cached_prompt_tokens == 0
    assert first["A"][-1].cached_prompt_tokens == 0  # the unedited run cached this prompt: A must not use it
    assert first["B"][-1].cached_prompt_tokens == 0
    for name in edits:
        assert (second[name][-1].cached_prompt_tokens or 0) >= 2 * block, name  # the same edit reuses its blocks
        assert tokens(first[name]) == tokens(second[name]) == tokens(cold[name]), name
        for a, b in zip(logprobs(second[name]), logprobs(cold[name]), strict=True):
            assert math.isclose(a, b, abs_tol=2e-3), name
    assert logprobs(first["A"]) != logprobs(first["none"]) != logprobs(first["B"])
