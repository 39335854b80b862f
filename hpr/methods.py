"""Edit methods as plug-ins: ``config.method`` in a checkpoint names one, and this registry maps it to its modules.

As PEFT's ``peft_type``: the checkpoint says which method it holds; :class:`hpr.checkpoint.HPRAdapter` builds one
module per trained layer through :func:`get_method`, and everything downstream (hooks, statistics, the server)
sees only the :class:`~hpr.edit_module.EditModule` contract. A new method is a module class plus one
:func:`register_method` call: its weights are saved under ``layers.<l>.<its state_dict keys>``.

Methods shipped:

- ``hpr``: Householder Pseudo-Rotation (``hpr.householder.HPRLayer``): probe + angle MLP, tensors
  ``probe.weight`` and ``angle.model.<i>.weight|bias``. Every checkpoint written before methods existed is one.
- ``steer``: an additive steering vector (``hpr.steering.SteeringVector``): tensor ``vector`` (h,).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from torch import nn

from hpr.errors import CheckpointError
from hpr.householder import HPRLayer, default_widths
from hpr.steering import SteeringVector


class MethodConfig(Protocol):
    """The fields of a checkpoint's config (:class:`hpr.checkpoint_format.HPRConfig`) a method reads and fills.

    A protocol rather than the config class itself: the config's validation looks its method up here, so this
    module must not import the config's.
    """

    hidden_size: int  # h
    angle_widths: list[int]  # HPR's angle-MLP widths h, h/2, ...; empty for other methods


@dataclass(frozen=True)
class EditMethod:
    """One edit method: how to check its config fields and build one decoder layer's module."""

    name: str
    description: str
    prepare: Callable[[MethodConfig], None]  # fill method defaults, raise CheckpointError on bad method fields
    build: Callable[[MethodConfig], nn.Module]  # one layer's module (an EditModule), float32, untrained


_METHODS: dict[str, EditMethod] = {}


def register_method(method: EditMethod) -> None:
    if method.name in _METHODS:
        raise ValueError(f"edit method {method.name!r} is already registered")
    _METHODS[method.name] = method


def get_method(name: str) -> EditMethod:
    """The registered method ``name``; :class:`CheckpointError` naming the known ones otherwise."""
    method = _METHODS.get(name)
    if method is None:
        raise CheckpointError(f"unknown edit method {name!r} (known: {sorted(_METHODS)})")
    return method


def method_names() -> list[str]:
    return sorted(_METHODS)


def _prepare_hpr(config: MethodConfig) -> None:
    if not config.angle_widths:
        config.angle_widths = default_widths(config.hidden_size)
    if config.angle_widths[0] != config.hidden_size:
        raise CheckpointError(f"angle_widths must start at hidden_size {config.hidden_size}: {config.angle_widths}")


def _prepare_steer(config: MethodConfig) -> None:
    if config.angle_widths:
        raise CheckpointError(f"method 'steer' has no angle MLP, but angle_widths is {config.angle_widths}")


register_method(
    EditMethod(
        name="hpr",
        description="Householder Pseudo-Rotation: a probe picks the tokens, an angle MLP says how far to rotate them",
        prepare=_prepare_hpr,
        build=lambda config: HPRLayer(config.hidden_size, config.angle_widths),
    )
)
register_method(
    EditMethod(
        name="steer",
        description="Additive steering vector: x + alpha * v, v the mean positive minus negative activation",
        prepare=_prepare_steer,
        build=lambda config: SteeringVector(config.hidden_size),
    )
)
