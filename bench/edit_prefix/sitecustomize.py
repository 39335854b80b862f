"""Experiment, not a product feature: edit only the first N generated tokens, for ``hpr-train eval-gen``.

The edit's fluency cost grows with the answer: every token of it is generated from edited states. The idea tried
here: steer the answer's first tokens, which choose what it says, and let the rest be generated unedited. With
this directory on ``PYTHONPATH`` and ``HPR_EDIT_PREFIX_BY_ALPHA=1`` in the environment, the server that
``eval-gen`` starts edits a request (scope ``generated``) only while it has generated fewer than N tokens, N chosen
per request by the fourth decimal of its alpha (which changes θ by < 0.1 %): 1 → 4, 2 → 8, 3 → 16, 0 → every
token (unchanged). So one run compares several N::

    PYTHONPATH=bench/edit_prefix HPR_EDIT_PREFIX_BY_ALPHA=1 .venv/bin/hpr-train eval-gen --out runs/prefix \\
        --split eval --adapter qa=runs/truthfulqa/checkpoint --config p8a1=qa:alpha=1.0002:scope=generated

Only generation follows the rule: ``eval-gen``'s chat-MC scoring edits every answer token as before. Python
imports ``sitecustomize`` at start-up; without the variable this file does nothing.
"""

import os

if os.environ.get("HPR_EDIT_PREFIX_BY_ALPHA"):
    from dataclasses import replace
    from types import SimpleNamespace

    from server.engine import batch as _b

    _PREFIX = {1: 4, 2: 8, 3: 16}

    def _limit(spec):  # type: ignore[no-untyped-def]
        return None if spec is None else _PREFIX.get(round(float(spec.alpha) * 10000) % 10)

    def _active(state) -> bool:  # type: ignore[no-untyped-def]
        limit = _limit(state.request.edit)
        return limit is None or len(state.generated) < limit

    def _shown(state):  # type: ignore[no-untyped-def]
        """The request state as the plan builders should see it: without its edit once past its N tokens."""
        return state if _active(state) else SimpleNamespace(request=SimpleNamespace(edit=None), stats=state.stats)

    _build = _b.DecodePlan.build.__func__
    _fits = _b.DecodePlan.fits

    def _prefix_build(cls, requests):  # type: ignore[no-untyped-def]
        plan = replace(_build(cls, [_shown(r) for r in requests]), rows=tuple(requests))
        plan._hpr_active = tuple(_active(r) for r in requests)
        return plan

    def _prefix_fits(self, batch):  # type: ignore[no-untyped-def]
        return _fits(self, batch) and getattr(self, "_hpr_active", None) == tuple(_active(r) for r in batch.requests)

    _b.DecodePlan.build = classmethod(_prefix_build)
    _b.DecodePlan.fits = _prefix_fits

    from server.engine import runner as _r

    _mixed = _r.mixed_edit_plan

    def _prefix_mixed(decoding, prefilling, inputs, start, stop):  # type: ignore[no-untyped-def]
        return _mixed([_shown(r) for r in decoding], prefilling, inputs, start, stop)

    _r.mixed_edit_plan = _prefix_mixed
