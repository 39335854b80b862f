"""Experiment, not a product feature: HPR with a stricter probe gate, for ``hpr-train eval-gen`` (docs/quality.md).

HPR rotates a token when its probe says p < 0.5. With this directory on ``PYTHONPATH`` and ``HPR_GATE_BY_ALPHA=1``
in the environment, the server that ``eval-gen`` starts (and ``eval-gen``'s own chat-MC scoring) rotate only where
p < g, g chosen per request by the fourth decimal of its alpha (which changes θ by < 0.1 %):
1 → 0.1, 2 → 0.2, 5 → 0.05, 0 → 0.5 (unchanged). So one run compares several gates::

    PYTHONPATH=experiments/probe_gate HPR_GATE_BY_ALPHA=1 .venv/bin/hpr-train eval-gen --out runs/gate-b \\
        --split train --max-questions 200 --adapter qa=runs/truthfulqa/checkpoint \\
        --config g05a1=qa:alpha=1.0005:scope=generated

Python imports ``sitecustomize`` at start-up; without the variable this file does nothing.
"""

import math
import os

if os.environ.get("HPR_GATE_BY_ALPHA"):
    import torch

    import hpr.householder as _h

    _GATES = {1: 0.1, 2: 0.2, 5: 0.05}
    _rotate = _h.HPRLayer.rotate

    def _gated_rotate(self, x, alpha=1.0, edit_mask=None):  # type: ignore[no-untyped-def]
        a = torch.as_tensor(alpha, dtype=torch.float64)
        code = (torch.round(a * 10000) % 10).long()
        threshold = torch.zeros_like(a)  # logit(0.5): the standard rule
        for digit, gate in _GATES.items():
            threshold = torch.where(
                code == digit, torch.tensor(math.log(gate / (1 - gate)), dtype=torch.float64), threshold
            )
        margin = _h.probe_margin(x.float(), self.probe.weight[0].float())  # w·x = logit(p)
        gate_mask = margin < threshold
        return _rotate(self, x, alpha, gate_mask if edit_mask is None else edit_mask & gate_mask)

    _h.HPRLayer.rotate = _gated_rotate
