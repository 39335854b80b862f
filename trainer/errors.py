"""Errors the trainer raises on purpose; each message names the file, field or value at fault."""

from __future__ import annotations

from hpr.errors import HPRError


class TrainerError(HPRError):
    """Base class of the trainer's own errors."""


class DataError(TrainerError):
    """Input data is missing, corrupt, empty, or has the wrong columns / keys."""


class StoreError(TrainerError):
    """The activation store cannot be written or read (disk full, corrupt shard, settings mismatch)."""
