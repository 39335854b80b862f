"""hpr — the shared core of hpr-serve: Householder Pseudo-Rotation math, checkpoints, model editing, loading."""

from hpr.checkpoint import HPRAdapter, HPRConfig
from hpr.editing import EditPlan, EditSpec, HPREditor, parse_layers
from hpr.errors import CheckpointError, EditSpecError, HPRError, ModelLoadError, UnknownAdapterError
from hpr.householder import HPRLayer, householder_rotate
from hpr.model import EMBEDDED_MODEL_ID, LoadedModel, load_model

__all__ = [
    "EMBEDDED_MODEL_ID",
    "CheckpointError",
    "EditPlan",
    "EditSpec",
    "EditSpecError",
    "HPRAdapter",
    "HPRConfig",
    "HPREditor",
    "HPRError",
    "HPRLayer",
    "LoadedModel",
    "ModelLoadError",
    "UnknownAdapterError",
    "householder_rotate",
    "load_model",
    "parse_layers",
]
__version__ = "0.1.0"
