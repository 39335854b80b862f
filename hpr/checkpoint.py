"""HPR checkpoints ("adapters"): one directory, one JSON config, one safetensors file.

Our format (``hpr_config.json`` + ``hpr_model.safetensors``, keys ``layers.<l>.probe.weight`` and
``layers.<l>.angle.model.<i>.weight|bias``) is documented in ``docs/checkpoint-format.md``. The seed's format
(``guidance_config.json`` + ``guidance.safetensors``, keys ``<l>.lr_model.weight`` and
``<l>.angle_model.model.<i>.weight|bias``) loads too.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from hpr.errors import CheckpointError
from hpr.householder import MAX_ALPHA, HPRLayer, default_widths

FORMAT_VERSION = 1
CONFIG_NAME = "hpr_config.json"
WEIGHTS_NAME = "hpr_model.safetensors"
SEED_CONFIG_NAME = "guidance_config.json"
SEED_WEIGHTS_NAME = "guidance.safetensors"


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
    angle_widths: list[int] = field(
        default_factory=list, metadata={"help": "Angle-MLP widths h, h/2, ... (the final → 1 is implicit)."}
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
    format_version: int = field(default=FORMAT_VERSION, metadata={"help": "Checkpoint format version."})
    training: dict[str, Any] = field(default_factory=dict, metadata={"help": "Provenance: data, seed, options."})

    def __post_init__(self) -> None:
        self.layers = sorted(int(x) for x in self.layers)
        self.selected_layers = sorted(int(x) for x in self.selected_layers)
        self.probe_accuracy = {int(k): float(v) for k, v in self.probe_accuracy.items()}
        if not self.angle_widths:
            self.angle_widths = default_widths(self.hidden_size)
        if self.hidden_size < 1 or self.num_layers < 1:
            raise CheckpointError(
                f"hidden_size and num_layers must be positive, got {self.hidden_size}, {self.num_layers}"
            )
        if self.angle_widths[0] != self.hidden_size:
            raise CheckpointError(f"angle_widths must start at hidden_size {self.hidden_size}: {self.angle_widths}")
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
        if self.format_version > FORMAT_VERSION:
            raise CheckpointError(f"format_version {self.format_version} is newer than this reader ({FORMAT_VERSION})")

    def to_json(self) -> str:
        data = asdict(self)
        data["probe_accuracy"] = {str(k): v for k, v in sorted(self.probe_accuracy.items())}
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HPRConfig:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


class HPRAdapter(nn.Module):
    """A set of per-layer HPR modules plus their config. Parameters are always float32."""

    def __init__(self, config: HPRConfig, name: str = "hpr", source: str | None = None) -> None:
        super().__init__()
        self.config = config
        self.name = name
        self.source = source
        self.modules_by_layer = nn.ModuleDict(
            {str(layer): HPRLayer(config.hidden_size, config.angle_widths) for layer in config.layers}
        )

    def layer(self, index: int) -> HPRLayer:
        module = self.modules_by_layer[str(index)]
        assert isinstance(module, HPRLayer)
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
        _atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(self.state_tensors(), tmp, metadata={"format": "pt"}))
        _atomic_write(path / CONFIG_NAME, lambda tmp: Path(tmp).write_text(self.config.to_json()))
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


def _atomic_write(target: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates 0600; a checkpoint is read by other users (a server container, a non-root service).
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def _parse_layer_list(value: Any) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [int(x) for x in value.split(",") if x.strip()]
    if isinstance(value, Sequence):
        return [int(x) for x in value]
    return None


def _load_seed(path: Path, name: str, num_layers: int | None) -> HPRAdapter:
    """The seed's layout: widths are read off the tensor shapes; every layer present is selected."""
    weights = path / SEED_WEIGHTS_NAME
    cfg: dict[str, Any] = _read_json(path / SEED_CONFIG_NAME) if (path / SEED_CONFIG_NAME).exists() else {}
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
    declared_hidden = cfg.get("base_model_hidden_size")
    if declared_hidden is not None and int(declared_hidden) != hidden:
        raise CheckpointError(f"{path}: config says hidden size {declared_hidden}, tensors have {hidden}")
    layers = sorted(by_layer)
    n_layers = num_layers if num_layers is not None else int(cfg.get("num_hidden_layers", max(layers) + 1))
    declared = _parse_layer_list(cfg.get("guided_layers", cfg.get("guidance_layers")))
    selected = [x for x in declared if x in by_layer] if declared else layers
    config = HPRConfig(
        base_model=str(cfg.get("base_model_name_or_path", "unknown")),
        hidden_size=hidden,
        num_layers=n_layers,
        layers=layers,
        selected_layers=selected,
        angle_widths=widths,
        training={"source_format": "seed", "seed_config": cfg},
    )
    adapter = HPRAdapter(config, name=name, source=str(path))
    state = {f"{layer}.{k}": v for layer, d in by_layer.items() for k, v in d.items()}
    _load_state(adapter, state, weights)
    return adapter


def save_seed_format(adapter: HPRAdapter, directory: str | os.PathLike[str]) -> Path:
    """Write ``adapter`` in the seed's layout (for compatibility tests and for users of the seed's tools)."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    for key, value in adapter.modules_by_layer.state_dict().items():
        layer, rest = key.split(".", 1)
        seed_rest = "lr_model.weight" if rest == "probe.weight" else rest.replace("angle.model.", "angle_model.model.")
        tensors[f"{layer}.{seed_rest}"] = value.detach().float().cpu().contiguous()
    save_file(tensors, str(path / SEED_WEIGHTS_NAME))
    cfg = {
        "base_model_hidden_size": adapter.config.hidden_size,
        "num_guidance_module_layers": len(adapter.config.angle_widths),
        "guidance_layers": adapter.config.selected_layers,
        "guidance_module_type": "householder",
    }
    (path / SEED_CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return path
