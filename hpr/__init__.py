"""hpr — the shared core of hpr-serve: edit methods (HPR, steering vectors), checkpoints, the adapter registry,
per-row edits hooked into a Hugging Face model, model loading."""

from hpr.checkpoint import HPRAdapter, HPRConfig
from hpr.edit_module import EditModule, EditResult
from hpr.edit_spec import EditSpec, Scope
from hpr.edit_stats import EditStats, EditStatsCounter, LayerEditStats
from hpr.editing import EditPlan, HPREditor
from hpr.errors import (
    AdapterConflictError,
    CheckpointError,
    EditSpecError,
    HPRError,
    ModelLoadError,
    UnknownAdapterError,
)
from hpr.householder import HPRLayer, householder_rotate
from hpr.methods import EditMethod, get_method, register_method
from hpr.model import EMBEDDED_MODEL_ID, LoadedModel, load_model
from hpr.registry import AdapterRegistry, parse_layers
from hpr.steering import SteeringVector

__all__ = [
    "EMBEDDED_MODEL_ID",
    "AdapterConflictError",
    "AdapterRegistry",
    "CheckpointError",
    "EditMethod",
    "EditModule",
    "EditPlan",
    "EditResult",
    "EditSpec",
    "EditSpecError",
    "EditStats",
    "EditStatsCounter",
    "HPRAdapter",
    "HPRConfig",
    "HPREditor",
    "HPRError",
    "HPRLayer",
    "LayerEditStats",
    "LoadedModel",
    "ModelLoadError",
    "Scope",
    "SteeringVector",
    "UnknownAdapterError",
    "get_method",
    "householder_rotate",
    "load_model",
    "parse_layers",
    "register_method",
]
__version__ = "0.1.0"
