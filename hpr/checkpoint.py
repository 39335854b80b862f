"""Checkpoints ("adapters"): one directory, one JSON config, one safetensors file.

Our format (``hpr_config.json`` + ``hpr_model.safetensors``, keys ``layers.<l>.<the method's tensor names>``, e.g.
``layers.<l>.probe.weight`` and ``layers.<l>.angle.model.<i>.weight|bias`` for HPR) is documented in
``docs/checkpoint-format.md``; ``method`` in the config names the edit method (``hpr.methods``). The seed's format
(``guidance_config.json`` + ``guidance.safetensors``, keys ``<l>.lr_model.weight`` and
``<l>.angle_model.model.<i>.weight|bias``, plus ``probe_results.json``), as the paper's reference code writes it,
loads too, and :func:`save_seed_format` writes it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from hpr.atomic_write import atomic_write
from hpr.edit_module import EditModule
from hpr.edit_spec import is_token_limit
from hpr.errors import CheckpointError
from hpr.householder import MAX_ALPHA
from hpr.methods import get_method

# 2: `method` names the edit method. A version-1 file (no `method`) is an HPR checkpoint and loads as one.
FORMAT_VERSION = 2
CONFIG_NAME = "hpr_config.json"
WEIGHTS_NAME = "hpr_model.safetensors"
SEED_CONFIG_NAME = "guidance_config.json"
SEED_WEIGHTS_NAME = "guidance.safetensors"
SEED_PROBE_RESULTS_NAME = "probe_results.json"  # written beside the checkpoint by evaluate_probe.py


@dataclass
class HPRConfig:
    """Everything needed to rebuild and validate an adapter; saved as sorted, indented JSON."""

    base_model: str = field(metadata={"help": "Id or path of the base model the adapter was trained on."})
    hidden_size: int = field(metadata={"help": "Hidden size of the base model (h)."})
    num_layers: int = field(metadata={"help": "Number of decoder layers of the base model."})
    layers: list[int] = field(metadata={"help": "Decoder layers that have a trained HPR module (0-based)."})
    selected_layers: list[int] = field(
        default_factory=list, metadata={"help": "Layers edited by default (subset of `layers`)."}
    )
    probe_accuracy: dict[int, float] = field(
        default_factory=dict, metadata={"help": "Eval-split probe accuracy per trained layer."}
    )
    method: str = field(
        default="hpr",
        metadata={
            "help": "Edit method the weights are for (hpr.methods): 'hpr' (the default, and every version-1 "
            "file) or 'steer'."
        },
    )
    angle_widths: list[int] = field(
        default_factory=list,
        metadata={"help": "HPR only: angle-MLP widths h, h/2, ... (the final → 1 is implicit). Empty otherwise."},
    )
    default_alpha: float = field(
        default=1.0, metadata={"help": "Edit strength used when a request gives none (the one evaluated in training)."}
    )
    default_scope: str = field(
        default="all",
        metadata={
            "help": "Positions edited when a request gives no scope: 'all' (every position) or 'generated' (the last "
            "prompt token and the generated ones). Chosen, like default_alpha, by the generation-mode evaluation."
        },
    )
    default_edit_tokens: int | None = field(
        default=None,
        metadata={
            "help": "How many generated tokens a request edits when it gives no edit_tokens: the first N are produced "
            "from edited states, the rest unedited (null: every one). Chosen, like default_alpha, by the "
            "generation-mode evaluation."
        },
    )
    format_version: int = field(default=FORMAT_VERSION, metadata={"help": "Checkpoint format version."})
    training: dict[str, Any] = field(default_factory=dict, metadata={"help": "Provenance: data, seed, options."})

    def __post_init__(self) -> None:
        self.layers = sorted(int(x) for x in self.layers)
        self.selected_layers = sorted(int(x) for x in self.selected_layers)
        self.probe_accuracy = {int(k): float(v) for k, v in self.probe_accuracy.items()}
        if self.format_version > FORMAT_VERSION:
            raise CheckpointError(f"format_version {self.format_version} is newer than this reader ({FORMAT_VERSION})")
        if self.hidden_size < 1 or self.num_layers < 1:
            raise CheckpointError(
                f"hidden_size and num_layers must be positive, got {self.hidden_size}, {self.num_layers}"
            )
        get_method(self.method).prepare(self)  # e.g. HPR's angle_widths: defaulted and checked
        bad = [x for x in self.layers if not 0 <= x < self.num_layers]
        if bad:
            raise CheckpointError(f"layers {bad} out of range for a {self.num_layers}-layer model")
        missing = sorted(set(self.selected_layers) - set(self.layers))
        if missing:
            raise CheckpointError(f"selected layers {missing} have no trained module (trained: {self.layers})")
        if not math.isfinite(self.default_alpha) or not 0.0 <= self.default_alpha <= MAX_ALPHA:
            raise CheckpointError(f"default_alpha must be finite and in [0, {MAX_ALPHA}], got {self.default_alpha}")
        if self.default_scope not in ("all", "generated"):
            raise CheckpointError(f"default_scope must be 'all' or 'generated', got {self.default_scope!r}")
        if self.default_edit_tokens is not None and not is_token_limit(self.default_edit_tokens):
            raise CheckpointError(
                f"default_edit_tokens must be null or a whole number ≥ 1, got {self.default_edit_tokens!r}"
            )

    def to_json(self) -> str:
        data = asdict(self)
        data["format_version"] = FORMAT_VERSION  # what is written is the current format, whatever was read
        data["probe_accuracy"] = {str(k): v for k, v in sorted(self.probe_accuracy.items())}
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HPRConfig:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


class HPRAdapter(nn.Module):
    """A checkpoint in memory: one module of ``config.method`` per trained layer, plus the config. float32.

    (The name is the project's: an hpr-serve adapter, whichever edit method it holds.)
    """

    def __init__(self, config: HPRConfig, name: str = "hpr", source: str | None = None) -> None:
        super().__init__()
        self.config = config
        self.name = name
        self.source = source
        method = get_method(config.method)
        self.modules_by_layer = nn.ModuleDict({str(layer): method.build(config) for layer in config.layers})

    def layer(self, index: int) -> nn.Module:
        """The trained module of decoder layer ``index`` (an ``HPRLayer`` for method ``hpr``)."""
        return self.modules_by_layer[str(index)]

    def edit_module(self, index: int) -> EditModule:
        """The trained module of decoder layer ``index``, as the hooks use it."""
        module: EditModule = self.modules_by_layer[str(index)]  # type: ignore[assignment]
        return module

    @property
    def layers(self) -> list[int]:
        return list(self.config.layers)

    def check_compatible(self, hidden_size: int, num_layers: int, where: str | None = None) -> None:
        """Raise :class:`CheckpointError` naming ``where`` unless the base model's shape matches."""
        src = where or self.source or self.name
        if self.config.hidden_size != hidden_size or self.config.num_layers != num_layers:
            raise CheckpointError(
                f"{src}: adapter was trained for hidden_size={self.config.hidden_size}, "
                f"num_layers={self.config.num_layers} ({self.config.base_model}), but the base model has "
                f"hidden_size={hidden_size}, num_layers={num_layers}"
            )

    # --- our format -------------------------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, Tensor]:
        """Tensor keys independent of the adapter's name: ``layers.<l>.probe.weight``, ``layers.<l>.angle...``."""
        out: dict[str, Tensor] = {}
        for key, value in self.modules_by_layer.state_dict().items():
            out[f"layers.{key}"] = value.detach().float().cpu().contiguous()
        return out

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write config + weights atomically (temp files renamed into place); returns the directory."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(self.state_tensors(), tmp, metadata={"format": "pt"}))
        atomic_write(path / CONFIG_NAME, lambda tmp: Path(tmp).write_text(self.config.to_json()))
        return path

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        name: str | None = None,
        hidden_size: int | None = None,
        num_layers: int | None = None,
    ) -> HPRAdapter:
        """Load our format or the seed's from ``directory``; validate against the base model when shapes given."""
        path = Path(directory)
        if not path.is_dir():
            raise CheckpointError(f"{path}: adapter directory does not exist")
        if (path / CONFIG_NAME).exists():
            adapter = _load_ours(path, name or path.name)
        elif (path / SEED_CONFIG_NAME).exists() or (path / SEED_WEIGHTS_NAME).exists():
            adapter = _load_seed(path, name or path.name, num_layers)
        else:
            raise CheckpointError(f"{path}: neither {CONFIG_NAME} nor {SEED_CONFIG_NAME} found")
        if hidden_size is not None and num_layers is not None:
            adapter.check_compatible(hidden_size, num_layers)
        return adapter.eval().requires_grad_(False)


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: cannot read JSON config: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: config must be a JSON object")
    return data


def _read_tensors(file: Path) -> dict[str, Tensor]:
    if not file.exists():
        raise CheckpointError(f"{file}: weights file is missing")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"{file}: cannot read safetensors weights: {exc}") from exc


def _load_state(adapter: HPRAdapter, state: dict[str, Tensor], file: Path) -> None:
    try:
        adapter.modules_by_layer.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{file}: weights do not match the config: {exc}") from exc
    for key, value in state.items():
        if not torch.isfinite(value).all():
            raise CheckpointError(f"{file}: tensor {key} holds NaN or inf")


def _load_ours(path: Path, name: str) -> HPRAdapter:
    cfg_file = path / CONFIG_NAME
    raw_config = _read_json(cfg_file)  # its errors already name the file
    try:
        config = HPRConfig.from_dict(raw_config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{cfg_file}: invalid config: {exc}") from exc
    except CheckpointError as exc:
        raise CheckpointError(f"{cfg_file}: {exc}") from exc
    weights = path / WEIGHTS_NAME
    raw = _read_tensors(weights)
    state = {k.removeprefix("layers."): v for k, v in raw.items()}
    adapter = HPRAdapter(config, name=name, source=str(path))
    _load_state(adapter, state, weights)
    return adapter


_SEED_KEY = re.compile(r"^(\d+)\.(lr_model\.weight|angle_model\.model\.(\d+)\.(weight|bias))$")
# The reference's IDS_LIST_PATTERN ("2,4"), with spaces around the numbers tolerated.
_SEED_IDS = re.compile(r"\s*\d+\s*(?:,\s*\d+\s*)*")
_SEED_FORMS = "an int (one layer), a '2,4' string, a list of ints, or an object {layer: probe accuracy}"
# Where older configs (and this project's save_seed_format before it matched the reference) kept the selection.
_SEED_SELECTION_FIELDS = ("selected_layers", "guided_layers", "guidance_layers")


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
    for key, acc in _read_json(file).items():
        layer = _seed_layer(key, file, "the probe results")
        accuracy[layer] = _seed_accuracy(acc, file, "the probe results", layer)
    _check_seed_layers(list(accuracy), file, "the probe results", num_layers, trained)
    return accuracy


def _load_seed(path: Path, name: str, num_layers: int | None) -> HPRAdapter:
    """The reference's layout: widths are read off the tensor shapes, the selection and accuracies off the JSON."""
    weights = path / SEED_WEIGHTS_NAME
    cfg_file = path / SEED_CONFIG_NAME
    cfg: dict[str, Any] = _read_json(cfg_file) if cfg_file.exists() else {}
    raw = _read_tensors(weights)
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
    adapter = HPRAdapter(config, name=name, source=str(path))
    state = {f"{layer}.{k}": v for layer, d in by_layer.items() for k, v in d.items()}
    _load_state(adapter, state, weights)
    return adapter


def save_seed_format(adapter: HPRAdapter, directory: str | os.PathLike[str]) -> Path:
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
    for key, value in adapter.modules_by_layer.state_dict().items():
        layer, rest = key.split(".", 1)
        seed_rest = "lr_model.weight" if rest == "probe.weight" else rest.replace("angle.model.", "angle_model.model.")
        tensors[f"{layer}.{seed_rest}"] = value.detach().float().cpu().contiguous()
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
