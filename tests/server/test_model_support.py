"""Refusals at the door (issue 28): an option the model cannot use, or a model transformers cannot build, stops the
server after the model's config is read and before its weights load, with a message naming the option or the
config field and the model type, and no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hpr.errors import ModelLoadError
from hpr.model import quantize_weights, read_model_config
from hpr.registry import AdapterRegistry
from server.cli import parse_settings
from server.engine.mixed import MIXABLE_MODEL_TYPES
from server.engine.support import UnsupportedOptionError, check_options
from tests.families import FAMILIES, WINDOW, WINDOWED, family_config, make_family_model

HPR_SERVE = Path(sys.executable).parent / "hpr-serve"


def _config(family: str, window: int | None = None):  # type: ignore[no-untyped-def]
    return family_config(family, vocab=102, eos=5, window=window)


@pytest.mark.parametrize("family", FAMILIES)
def test_compile_decode_is_accepted_only_for_the_loops_it_runs(family: str) -> None:
    config = _config(family)
    if family in MIXABLE_MODEL_TYPES:  # each tested compiled in tests/server/engine/test_families.py
        check_options(config, compile_decode=True)
        return
    with pytest.raises(UnsupportedOptionError, match=f"^--compile-decode: .* not of model type '{config.model_type}'"):
        check_options(config, compile_decode=True)
    check_options(config)  # without the option: fine


@pytest.mark.parametrize("family", [f for f in WINDOWED if f in MIXABLE_MODEL_TYPES])
def test_compile_decode_is_refused_for_a_sliding_window(family: str) -> None:
    with pytest.raises(UnsupportedOptionError, match=f"'{family}' has sliding-window attention .*={WINDOW}"):
        check_options(_config(family, WINDOW), compile_decode=True)


def test_int8_on_conv1d_layers_is_refused_before_and_after_the_load() -> None:
    with pytest.raises(UnsupportedOptionError, match=r"^--quantization int8: model type 'gpt2' keeps its weights in"):
        check_options(_config("gpt2"), quantization="int8")
    pytest.importorskip("torchao")
    model = make_family_model("gpt2").model  # past the door (a caller of load_model): never a silent no-op
    with pytest.raises(ModelLoadError, match=r"'gpt2' has no nn.Linear layers to quantize .*Conv1D"):
        quantize_weights(model, "int8")


def test_the_factory_refuses_before_any_weight_loads(
    tiny_family_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import server.runtime as runtime

    def no_load(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(runtime, "load_model", no_load)
    settings = parse_settings(["--model", str(tiny_family_dirs["gpt2"]), "--compile-decode"])
    with pytest.raises(UnsupportedOptionError, match="not of model type 'gpt2'"):
        runtime.hf_engine_factory(settings, AdapterRegistry())


def _write_config(directory: Path, **fields: object) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(fields))
    return directory


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"model_type": "llama-next", "architectures": ["LlamaNextForCausalLM"]},
         r"config.json: model_type 'llama-next' is not a model type transformers .* knows"),
        ({"architectures": ["MyForCausalLM"]}, r"config.json: model_type None is not a model type"),
        ({"model_type": "llama", "architectures": ["MyLlamaForCausalLM"]},
         r"config.json: architectures \['MyLlamaForCausalLM'\] names no class transformers .* has"),
        ({"model_type": "clip"}, r"config.json: model_type 'clip' has no causal language model"),
    ],
)  # fmt: skip
def test_a_config_transformers_cannot_build_is_named(tmp_path: Path, fields: dict[str, object], message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        read_model_config(str(_write_config(tmp_path / "model", **fields)))


@pytest.mark.skipif(not HPR_SERVE.exists(), reason="hpr-serve console script not installed")
def test_hpr_serve_stops_with_the_option_and_the_model_type_and_no_traceback(tiny_family_dirs: dict[str, Path]) -> None:
    cmd = [str(HPR_SERVE), "--model", str(tiny_family_dirs["gpt2"]), "--compile-decode", "--port", "0"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "startup failed: --compile-decode:" in result.stderr and "'gpt2'" in result.stderr
    assert "Traceback" not in result.stderr
    assert "loaded " not in result.stderr  # the weights never loaded


@pytest.fixture(scope="module")
def tiny_family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Saved model directories (config, weights, tokenizer) of some tiny families."""
    out: dict[str, Path] = {}
    for family in ("gpt2",):
        directory = tmp_path_factory.mktemp(family)
        loaded = make_family_model(family)
        loaded.model.save_pretrained(str(directory))
        loaded.tokenizer.save_pretrained(str(directory))
        out[family] = directory
    return out
