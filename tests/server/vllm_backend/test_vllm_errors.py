"""Refusals of the vllm backend: each a clear error naming what is wrong, before vLLM starts anything."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from hpr.errors import ModelLoadError
from hpr.registry import AdapterRegistry
from server.settings import ServerSettings
from tests.server.vllm_backend.conftest import require_vllm
from tests.server.vllm_backend.families import save_family_model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_family_model(tmp_path_factory.mktemp("llama") / "llama", "llama")


def factory(settings: ServerSettings) -> None:
    from server.vllm_backend.engine import vllm_engine_factory

    vllm_engine_factory(settings, AdapterRegistry())


def test_without_vllm_the_error_names_the_extra(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm → ImportError
    with pytest.raises(ModelLoadError, match=r"hpr-serve\[vllm\]"):
        factory(ServerSettings(model=str(llama_dir), backend="vllm"))


def test_an_unknown_engine_argument_is_refused_before_vllm_starts(llama_dir: Path) -> None:
    require_vllm()
    import vllm.v1.engine.async_llm as async_llm

    started: list[object] = []
    original = async_llm.AsyncLLM.from_engine_args
    async_llm.AsyncLLM.from_engine_args = lambda *a, **k: started.append(a)  # type: ignore[method-assign]
    try:
        settings = ServerSettings(model=str(llama_dir), backend="vllm", vllm_arg=["max_num_seqs=4", "no_such_arg=1"])
        with pytest.raises(ModelLoadError, match="no_such_arg"):
            factory(settings)
    finally:
        async_llm.AsyncLLM.from_engine_args = original  # type: ignore[method-assign]
    assert started == []


def test_an_architecture_the_vllm_backend_does_not_edit_is_refused(tmp_path: Path) -> None:
    require_vllm()
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100)).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"GPT2LMHeadModel.*--backend hf"):
        factory(ServerSettings(model=str(tmp_path), backend="vllm"))


def test_hf_only_options_and_vllm_options_are_refused_with_the_other_backend() -> None:
    with pytest.raises(ValidationError, match=r"--compile-decode.*--backend hf"):
        ServerSettings(backend="vllm", compile_decode=True)
    with pytest.raises(ValidationError, match="--quantization int8"):
        ServerSettings(backend="vllm", quantization="int8")
    with pytest.raises(ValidationError, match="need --backend vllm"):
        ServerSettings(vllm_arg=["enforce_eager=true"])


def test_vllm_arguments_parse_as_json_values() -> None:
    from server.vllm_backend.engine_args import parse_vllm_arg

    assert parse_vllm_arg("max-num-seqs=64") == ("max_num_seqs", 64)
    assert parse_vllm_arg("enforce_eager=true") == ("enforce_eager", True)
    assert parse_vllm_arg('compilation_config={"mode": 0}') == ("compilation_config", {"mode": 0})
    assert parse_vllm_arg("dtype=bfloat16") == ("dtype", "bfloat16")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_vllm_arg("enforce_eager")


def test_a_model_vllm_cannot_load_is_a_clear_error_and_leaves_no_process(tmp_path: Path) -> None:
    """A llama directory whose weights file is not safetensors: vLLM's engine fails to start; the error names the
    directory, and none of the processes vLLM started is left running."""
    require_vllm()
    import shutil

    import psutil

    model = save_family_model(tmp_path / "broken", "llama")
    for weights in model.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(ModelLoadError, match="vLLM could not load the model") as failure:
        factory(ServerSettings(model=str(model), backend="vllm", vllm_arg=["enforce_eager=true"]))
    assert str(model) in str(failure.value)
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before and p.is_running()]
    # multiprocessing's resource tracker stays for the life of this process whatever vLLM does: not vLLM's
    alive = [p for p in left if p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(p.cmdline())]
    assert alive == [], [p.name() for p in alive]
    shutil.rmtree(model)


def test_the_engine_constrains_with_llguidance_unless_the_user_says_otherwise(llama_dir: Path) -> None:
    """vLLM's guidance backend builds the hf engine's grammar from the schema we pass; an explicit
    ``structured_outputs_config`` wins; a wrong one is a clear error before vLLM starts."""
    require_vllm()
    from server.vllm_backend.engine_args import engine_args_for

    def backend(*vllm_arg: str) -> str:
        settings = ServerSettings(backend="vllm", vllm_arg=list(vllm_arg))
        return str(engine_args_for(settings, str(llama_dir), "llama").structured_outputs_config.backend)

    assert backend() == "guidance"
    assert backend('structured_outputs_config={"backend": "xgrammar"}') == "xgrammar"
    with pytest.raises(ModelLoadError, match=r"vLLM engine arguments .*no-such-library"):
        backend('structured_outputs_config={"backend": "no-such-library"}')
