"""AdapterRegistry: validation against the model's shape, resolving edits, and unloading only once unused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hpr.errors import AdapterConflictError, CheckpointError, EditSpecError, UnknownAdapterError
from hpr.registry import AdapterRegistry
from tests.conftest import make_random_adapter, make_steering_adapter


def bound() -> AdapterRegistry:
    registry = AdapterRegistry()
    registry.bind(64, 4, torch.device("cpu"))
    return registry


def test_load_validates_against_the_model_shape_and_names_the_file(tmp_path: Path) -> None:
    make_random_adapter(hidden=32).save(tmp_path / "small")
    make_steering_adapter().save(tmp_path / "steer")
    registry = bound()
    with pytest.raises(CheckpointError, match=r"small.*hidden_size=32"):
        registry.load("small", tmp_path / "small")
    assert "small" not in registry and registry.names() == []
    registry.load("steer", tmp_path / "steer")
    assert registry.names() == ["steer"] and registry.get("steer").config.method == "steer"
    with pytest.raises(AdapterConflictError, match="already loaded"):
        registry.load("steer", tmp_path / "steer")


def test_resolve_uses_the_adapter_defaults_and_checks_layers() -> None:
    adapter = make_random_adapter(trained=[1, 2])
    adapter.config.default_alpha, adapter.config.default_scope = 2.0, "generated"
    registry = AdapterRegistry.of({"a": adapter}, 64, 4)
    spec = registry.resolve("a")
    assert (spec.adapter, spec.layers, spec.alpha, spec.scope) == ("a", (1, 2), 2.0, "generated")
    assert registry.resolve("a", "2", 0.5, "all").layers == (2,)
    with pytest.raises(EditSpecError, match="no trained module"):
        registry.resolve("a", [0])
    with pytest.raises(UnknownAdapterError, match=r"'b' is not loaded \(loaded: \['a'\]\)"):
        registry.resolve("b")


def test_resolve_takes_edit_tokens_from_the_request_or_the_checkpoint() -> None:
    adapter = make_random_adapter(trained=[1, 2])
    registry = AdapterRegistry.of({"a": adapter}, 64, 4)
    assert registry.resolve("a").tokens is None  # a checkpoint that records none: every generated token
    adapter.config.default_edit_tokens = 4
    assert registry.resolve("a").tokens == 4
    assert registry.resolve("a", tokens=2).tokens == 2
    assert registry.resolve("a", tokens="all").tokens is None
    for bad in (0, -1, True, 2.5):
        with pytest.raises(EditSpecError, match="edit_tokens must be a whole number"):
            registry.resolve("a", tokens=bad)  # type: ignore[arg-type]


def test_unload_waits_for_running_requests() -> None:
    registry = AdapterRegistry.of({"a": make_random_adapter(), "b": make_random_adapter(seed=1)}, 64, 4)
    registry.acquire("a")
    registry.acquire("a")
    assert registry.unload("a") is False  # two requests still run on it
    assert "a" not in registry and registry.names() == ["b"]
    with pytest.raises(UnknownAdapterError):
        registry.resolve("a")  # a new request: 404
    with pytest.raises(UnknownAdapterError):
        registry.acquire("a")  # a request resolved just before the unload: refused at admission
    with pytest.raises(AdapterConflictError, match="still being unloaded"):
        registry.add("a", make_random_adapter())
    assert registry.get("a").config.layers == [0, 1, 2, 3]  # the running ones keep their modules
    registry.release("a")
    assert registry.get("a") is not None
    registry.release("a")
    with pytest.raises(UnknownAdapterError):
        registry.get("a")  # gone with its last request
    registry.add("a", make_random_adapter(seed=2))  # the name is free again
    assert registry.unload("b") is True and registry.names() == ["a"]  # nothing ran on b: dropped at once
    with pytest.raises(UnknownAdapterError):
        registry.unload("b")
