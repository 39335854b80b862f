"""The checkpoint format's vocabulary: file names, format version, the config record, and the two file readers.

Everything both formats share, kept below them so that imports run one way: :mod:`hpr.checkpoint` (our format, and
:class:`~hpr.checkpoint.HPRAdapter`, which loads either) → :mod:`hpr.seed_format` (the paper's reference format) →
this module → :mod:`hpr.methods`. The layout is documented in ``docs/checkpoint-format.md``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

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


def read_json(file: Path) -> dict[str, Any]:
    """``file`` as a JSON object; :class:`CheckpointError` naming the file if it is unreadable or not an object."""
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: cannot read JSON config: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: config must be a JSON object")
    return data


def read_tensors(file: Path) -> dict[str, Tensor]:
    """The tensors of the safetensors ``file``; :class:`CheckpointError` naming the file if missing or corrupt."""
    if not file.exists():
        raise CheckpointError(f"{file}: weights file is missing")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"{file}: cannot read safetensors weights: {exc}") from exc
