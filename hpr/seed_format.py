"""The seed's checkpoint format: what the paper's reference code writes, read and written here.

``guidance_config.json`` + ``guidance.safetensors`` (keys ``<l>.lr_model.weight`` and
``<l>.angle_model.model.<i>.weight|bias``), plus ``probe_results.json`` from its ``evaluate_probe.py``.
:meth:`hpr.checkpoint.HPRAdapter.load` reads it through :func:`read_seed`; :func:`save_seed_format` writes it.
This module builds on :mod:`hpr.checkpoint_format` only, not on :mod:`hpr.checkpoint`, which imports it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from safetensors.torch import save_file
from torch import Tensor

from hpr.atomic_write import atomic_write
from hpr.checkpoint_format import (
    SEED_CONFIG_NAME,
    SEED_PROBE_RESULTS_NAME,
    SEED_WEIGHTS_NAME,
    HPRConfig,
    read_json,
    read_tensors,
)
from hpr.errors import CheckpointError

_SEED_KEY = re.compile(r"^(\d+)\.(lr_model\.weight|angle_model\.model\.(\d+)\.(weight|bias))$")
# The reference's IDS_LIST_PATTERN ("2,4"), with spaces around the numbers tolerated.
_SEED_IDS = re.compile(r"\s*\d+\s*(?:,\s*\d+\s*)*")
_SEED_FORMS = "an int (one layer), a '2,4' string, a list of ints, or an object {layer: probe accuracy}"
# Where older configs (and this project's save_seed_format before it matched the reference) kept the selection.
_SEED_SELECTION_FIELDS = ("selected_layers", "guided_layers", "guidance_layers")


class AdapterWeights(Protocol):
    """What :func:`save_seed_format` reads of an :class:`hpr.checkpoint.HPRAdapter`."""

    @property
    def config(self) -> HPRConfig: ...

    def state_tensors(self) -> dict[str, Tensor]: ...


def _layer_names(layers: Sequence[int]) -> str:
    return f"layer {layers[0]}" if len(layers) == 1 else f"layers {list(layers)}"


def _seed_layer(item: Any, file: Path, what: str) -> int:
    """One layer index as the reference accepts it: an int, or digits in a string (JSON object keys are strings)."""
    if isinstance(item, int) and not isinstance(item, bool):
        return item
    if isinstance(item, str) and re.fullmatch(r"\s*-?\d+\s*", item):
        return int(item)
    raise CheckpointError(f"{file}: {what} holds {item!r}, which is not a layer index")


def _seed_accuracy(value: Any, file: Path, what: str, layer: int) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise CheckpointError(
            f"{file}: {what} gives layer {layer} the probe accuracy {value!r}, not a number in [0, 1]"
        )
    return float(value)


def _parse_seed_selection(value: Any, file: Path, what: str) -> tuple[list[int], dict[int, float]]:
    """The forms the reference's ``prepare_modules_for_inference`` enables → (layers, probe accuracy per layer).

    An int is one layer index (not a top-k count); a dict is what ``evaluate_probe.py --top_k`` saves.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return [value], {}
    if isinstance(value, str) and _SEED_IDS.fullmatch(value):
        return [int(x) for x in value.split(",")], {}
    if isinstance(value, list):
        return [_seed_layer(x, file, what) for x in value], {}
    if isinstance(value, dict):
        accuracy: dict[int, float] = {}
        for key, acc in value.items():
            layer = _seed_layer(key, file, what)
            accuracy[layer] = _seed_accuracy(acc, file, what, layer)
        return list(accuracy), accuracy
    raise CheckpointError(f"{file}: {what} is {value!r}; expected {_SEED_FORMS}")


def _check_seed_layers(layers: Sequence[int], file: Path, what: str, num_layers: int, trained: list[int]) -> list[int]:
    """Sorted, de-duplicated ``layers``; every one in range and with a module (the reference only warns)."""
    out_of_range = sorted({x for x in layers if not 0 <= x < num_layers})
    if out_of_range:
        raise CheckpointError(
            f"{file}: {what} names {_layer_names(out_of_range)}, out of range for a {num_layers}-layer base model"
        )
    untrained = sorted(set(layers) - set(trained))
    if untrained:
        raise CheckpointError(
            f"{file}: {what} names {_layer_names(untrained)} with no module in {SEED_WEIGHTS_NAME} "
            f"(modules: layers {trained})"
        )
    return sorted(set(layers))


def _seed_positive_int(cfg: Mapping[str, Any], key: str, file: Path) -> int | None:
    value = cfg.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{file}: {key} must be a positive integer, got {value!r}")
    return value


def _read_probe_results(file: Path, num_layers: int, trained: list[int]) -> dict[int, float]:
    """``probe_results.json`` as ``evaluate_probe.py`` writes it: {layer: eval-split probe accuracy}; {} if absent."""
    if not file.exists():
        return {}
    accuracy: dict[int, float] = {}
    for key, acc in read_json(file).items():
        layer = _seed_layer(key, file, "the probe results")
        accuracy[layer] = _seed_accuracy(acc, file, "the probe results", layer)
    _check_seed_layers(list(accuracy), file, "the probe results", num_layers, trained)
    return accuracy


def read_seed(path: Path, num_layers: int | None) -> tuple[HPRConfig, dict[str, Tensor]]:
    """The reference's layout in ``path``: its config and its tensors, keyed as ``HPRAdapter.modules_by_layer``
    names them (``<l>.probe.weight``, ``<l>.angle.model.<i>.weight|bias``).

    Widths are read off the tensor shapes, the selection and accuracies off the JSON.
    """
    weights = path / SEED_WEIGHTS_NAME
    cfg_file = path / SEED_CONFIG_NAME
    cfg: dict[str, Any] = read_json(cfg_file) if cfg_file.exists() else {}
    raw = read_tensors(weights)
    by_layer: dict[int, dict[str, Tensor]] = {}
    for key, value in raw.items():
        m = _SEED_KEY.match(key)
        if m is None:
            raise CheckpointError(f"{weights}: unexpected tensor key {key!r} for the seed's layout")
        layer = int(m.group(1))
        sub = "probe.weight" if m.group(2) == "lr_model.weight" else f"angle.model.{m.group(3)}.{m.group(4)}"
        by_layer.setdefault(layer, {})[sub] = value
    if not by_layer:
        raise CheckpointError(f"{weights}: no HPR tensors")
    first = by_layer[min(by_layer)]
    if "probe.weight" not in first:
        raise CheckpointError(f"{weights}: layer {min(by_layer)} has no lr_model.weight")
    hidden = int(first["probe.weight"].shape[-1])
    linear_ids = sorted(int(k.split(".")[2]) for k in first if k.startswith("angle.model.") and k.endswith(".weight"))
    widths = [int(first[f"angle.model.{i}.weight"].shape[1]) for i in linear_ids]
    if not widths:
        raise CheckpointError(f"{weights}: layer {min(by_layer)} has no angle_model weights")
    declared_hidden = _seed_positive_int(cfg, "base_model_hidden_size", cfg_file)
    if declared_hidden is not None and declared_hidden != hidden:
        raise CheckpointError(f"{cfg_file}: base_model_hidden_size is {declared_hidden}, the tensors have {hidden}")
    layers = sorted(by_layer)
    target = cfg.get("target_layers")
    if isinstance(target, list) and sorted({_seed_layer(x, cfg_file, "target_layers") for x in target}) != layers:
        raise CheckpointError(f"{cfg_file}: target_layers is {target}, but {SEED_WEIGHTS_NAME} has layers {layers}")
    # The base model's depth as the checkpoint records it wins over the caller's: a mismatch is then reported by
    # check_compatible instead of being hidden.
    declared_layers = _seed_positive_int(cfg, "base_model_num_hidden_layers", cfg_file)
    declared_layers = declared_layers or _seed_positive_int(cfg, "num_hidden_layers", cfg_file)
    n_layers = declared_layers or num_layers or max(layers) + 1
    # None (or no field) enables every module, as in the reference; [] or {} enables none.
    what = next((k for k in _SEED_SELECTION_FIELDS if cfg.get(k) is not None), None)
    selected: list[int] = layers
    accuracy: dict[int, float] = {}
    if what is not None:
        declared, accuracy = _parse_seed_selection(cfg[what], cfg_file, what)
        selected = _check_seed_layers(declared, cfg_file, what, n_layers, layers)
    probe_file = path / SEED_PROBE_RESULTS_NAME
    # Both come from the same evaluate_probe.py run; the config's copy is the one that chose the layers.
    accuracy = {**_read_probe_results(probe_file, n_layers, layers), **accuracy}
    base_model = cfg.get("base_model_name_or_path")
    if base_model is not None and not isinstance(base_model, str):
        raise CheckpointError(f"{cfg_file}: base_model_name_or_path must be a string, got {base_model!r}")
    try:
        config = HPRConfig(
            base_model=base_model or "unknown",
            hidden_size=hidden,
            num_layers=n_layers,
            layers=layers,
            selected_layers=selected,
            probe_accuracy=accuracy,
            angle_widths=widths,
            training={"source_format": "seed", "seed_config": cfg},
        )
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    return config, {f"{layer}.{k}": v for layer, d in by_layer.items() for k, v in d.items()}


def save_seed_format(adapter: AdapterWeights, directory: str | os.PathLike[str]) -> Path:
    """Write ``adapter`` as the reference code leaves it after ``evaluate_probe.py`` (for its users and for tests).

    ``guidance_config.json`` holds every ``GuidanceConfig`` field; ``selected_layers`` is the ``{layer: accuracy}``
    object of ``--top_k`` when every selected layer has a probe accuracy, else a list (as ``--threshold`` leaves
    it). ``probe_results.json`` is written when the adapter has probe accuracies. The seed has no field for
    ``default_alpha`` / ``default_scope`` / ``default_edit_tokens``: they are not written.
    """
    config = adapter.config
    if config.method != "hpr":
        raise CheckpointError(f"the seed's format holds HPR modules only; this adapter's method is {config.method!r}")
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    for key, value in adapter.state_tensors().items():
        layer, rest = key.removeprefix("layers.").split(".", 1)
        seed_rest = "lr_model.weight" if rest == "probe.weight" else rest.replace("angle.model.", "angle_model.model.")
        tensors[f"{layer}.{seed_rest}"] = value
    atomic_write(path / SEED_WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    selected: list[int] | dict[str, float] = list(config.selected_layers)
    if config.selected_layers and all(x in config.probe_accuracy for x in config.selected_layers):
        selected = {str(x): config.probe_accuracy[x] for x in config.selected_layers}
    widths = config.angle_widths
    # The reference rebuilds widths h, h/2, h/4, ... (guidance_hidden_size None) or h, g, g, ... (= g).
    halving = widths == [config.hidden_size // 2**i for i in range(len(widths))]
    cfg = {
        "base_model_hidden_size": config.hidden_size,
        "base_model_name_or_path": config.base_model,
        "base_model_num_hidden_layers": config.num_layers,
        "guidance_hidden_size": None if halving or len(widths) < 2 else widths[1],
        "guidance_module_type": "householder",
        "num_guidance_module_layers": len(widths),
        "selected_layers": selected,
        "target_layers": list(config.layers),
    }
    text = json.dumps(cfg, indent=2, sort_keys=True) + "\n"
    atomic_write(path / SEED_CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    if config.probe_accuracy:
        results = json.dumps({str(k): v for k, v in sorted(config.probe_accuracy.items())})
        atomic_write(path / SEED_PROBE_RESULTS_NAME, lambda tmp: Path(tmp).write_text(results))
    return path
