"""Checkpoints ("adapters"): one directory, one JSON config, one safetensors file.

Our format (``hpr_config.json`` + ``hpr_model.safetensors``, keys ``layers.<l>.<the method's tensor names>``, e.g.
``layers.<l>.probe.weight`` and ``layers.<l>.angle.model.<i>.weight|bias`` for HPR) is documented in
``docs/checkpoint-format.md``; ``method`` in the config names the edit method (``hpr.methods``). The seed's format
(``guidance_config.json`` + ``guidance.safetensors``, keys ``<l>.lr_model.weight`` and
``<l>.angle_model.model.<i>.weight|bias``, plus ``probe_results.json``), as the paper's reference code writes it,
loads too (:mod:`hpr.seed_format`, whose :func:`~hpr.seed_format.save_seed_format` writes it).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
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
                f"{src}: adapter was trained ({CONFIG_NAME}) for hidden_size={self.config.hidden_size}, "
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
            from hpr.seed_format import load_seed  # the seed's reader builds on this module

            adapter = load_seed(path, name or path.name, num_layers)
        else:
            raise CheckpointError(f"{path}: neither {CONFIG_NAME} nor {SEED_CONFIG_NAME} found")
        if hidden_size is not None and num_layers is not None:
            adapter.check_compatible(hidden_size, num_layers)
        return adapter.eval().requires_grad_(False)


def read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: cannot read JSON config: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: config must be a JSON object")
    return data


def read_tensors(file: Path) -> dict[str, Tensor]:
    if not file.exists():
        raise CheckpointError(f"{file}: weights file is missing")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"{file}: cannot read safetensors weights: {exc}") from exc


def load_state(adapter: HPRAdapter, state: dict[str, Tensor], file: Path) -> None:
    try:
        adapter.modules_by_layer.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{file}: weights do not match the config: {exc}") from exc
    for key, value in state.items():
        if not torch.isfinite(value).all():
            raise CheckpointError(f"{file}: tensor {key} holds NaN or inf")


def _load_ours(path: Path, name: str) -> HPRAdapter:
    cfg_file = path / CONFIG_NAME
    raw_config = read_json(cfg_file)  # its errors already name the file
    try:
        config = HPRConfig.from_dict(raw_config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{cfg_file}: invalid config: {exc}") from exc
    except CheckpointError as exc:
        raise CheckpointError(f"{cfg_file}: {exc}") from exc
    weights = path / WEIGHTS_NAME
    raw = read_tensors(weights)
    state = {k.removeprefix("layers."): v for k, v in raw.items()}
    adapter = HPRAdapter(config, name=name, source=str(path))
    load_state(adapter, state, weights)
    return adapter
