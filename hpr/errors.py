"""Exception types raised by the core. The server maps them to HTTP statuses in one place."""

from __future__ import annotations


class HPRError(Exception):
    """Base class of every error the core raises on purpose."""


class CheckpointError(HPRError):
    """A checkpoint directory is missing, corrupt, or does not match the base model."""


class ModelLoadError(HPRError):
    """The base model could not be found or loaded."""


class EditSpecError(HPRError, ValueError):
    """An edit request is malformed: bad layer spec, layer out of range, alpha out of bounds, unknown adapter.

    ``param`` names the offending field (e.g. ``"hpr.layers"``) so an API can point at it.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class UnknownAdapterError(EditSpecError):
    """The requested adapter id is not loaded."""


class AdapterConflictError(HPRError):
    """An adapter is already loaded (or still unloading) under the name asked for."""
