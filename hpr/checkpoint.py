"""Checkpoints ("adapters"): one directory, one JSON config, one safetensors file.

Our format (``hpr_config.json`` + ``hpr_model.safetensors``, keys ``layers.<l>.<the method's tensor names>``, e.g.
``layers.<l>.probe.weight`` and ``layers.<l>.angle.model.<i>.weight|bias`` for HPR) is documented in
``docs/checkpoint-format.md``; ``method`` in the config names the edit method (``hpr.methods``). The seed's format
(``guidance_config.json`` + ``guidance.safetensors``, keys ``<l>.lr_model.weight`` and
``<l>.angle_model.model.<i>.weight|bias``, plus ``probe_results.json``), as the paper's reference code writes it,
loads too (:mod:`hpr.seed_format`, whose :func:`~hpr.seed_format.save_seed_format` writes it). The file names and
:class:`HPRConfig` live in :mod:`hpr.checkpoint_format`, which both formats build on; they are importable from here
as before.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from hpr.atomic_write import atomic_write
from hpr.checkpoint_format import (
    CONFIG_NAME,
    FORMAT_VERSION,
    SEED_CONFIG_NAME,
    SEED_PROBE_RESULTS_NAME,
    SEED_WEIGHTS_NAME,
    WEIGHTS_NAME,
    HPRConfig,
    read_json,
    read_tensors,
)
from hpr.edit_module import EditModule
from hpr.errors import CheckpointError
from hpr.methods import get_method
from hpr.seed_format import read_seed

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "SEED_CONFIG_NAME",
    "SEED_PROBE_RESULTS_NAME",
    "SEED_WEIGHTS_NAME",
    "WEIGHTS_NAME",
    "HPRAdapter",
    "HPRConfig",
    "load_state",
]


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
            config, state = _read_ours(path)
            weights = path / WEIGHTS_NAME
        elif (path / SEED_CONFIG_NAME).exists() or (path / SEED_WEIGHTS_NAME).exists():
            config, state = read_seed(path, num_layers)
            weights = path / SEED_WEIGHTS_NAME
        else:
            raise CheckpointError(f"{path}: neither {CONFIG_NAME} nor {SEED_CONFIG_NAME} found")
        adapter = cls(config, name=name or path.name, source=str(path))
        load_state(adapter, state, weights)
        if hidden_size is not None and num_layers is not None:
            adapter.check_compatible(hidden_size, num_layers)
        return adapter.eval().requires_grad_(False)


def load_state(adapter: HPRAdapter, state: dict[str, Tensor], file: Path) -> None:
    """Put ``state`` (keyed as ``adapter.modules_by_layer`` names its tensors) into ``adapter``; a
    :class:`CheckpointError` naming ``file`` if the tensors do not fit the config or hold NaN or inf."""
    try:
        adapter.modules_by_layer.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{file}: weights do not match the config: {exc}") from exc
    for key, value in state.items():
        if not torch.isfinite(value).all():
            raise CheckpointError(f"{file}: tensor {key} holds NaN or inf")


def _read_ours(path: Path) -> tuple[HPRConfig, dict[str, Tensor]]:
    """Our format in ``path``: its config, and its tensors keyed as ``HPRAdapter.modules_by_layer`` names them."""
    cfg_file = path / CONFIG_NAME
    raw_config = read_json(cfg_file)  # its errors already name the file
    try:
        config = HPRConfig.from_dict(raw_config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{cfg_file}: invalid config: {exc}") from exc
    except CheckpointError as exc:
        raise CheckpointError(f"{cfg_file}: {exc}") from exc
    raw = read_tensors(path / WEIGHTS_NAME)
    return config, {k.removeprefix("layers."): v for k, v in raw.items()}
