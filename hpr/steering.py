"""An additive steering vector, the second edit method: x' = x + α·v on the edited positions.

v is one vector per decoder layer, trained as the mean difference between the activations of positive and of
negative answers (``trainer/steer.py``; "contrastive activation addition", and ITI's mass-mean direction without
its per-head split). Unlike HPR it has no probe: every position inside the mask is shifted, and the norm of x
changes. What :meth:`SteeringVector.edit` reports as ``amount`` is the angle between x and x' (radians), so the
per-layer statistics read the same as HPR's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hpr.edit_module import EditResult
from hpr.householder import angle_between


class SteeringVector(nn.Module):
    """One decoder layer's steering vector ``vector`` (h,), float32."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.vector = nn.Parameter(torch.zeros(hidden_size))

    def edit(self, x: Tensor, alpha: Tensor | float = 1.0, edit_mask: Tensor | None = None) -> EditResult:
        """x' = x + α·v on the positions of ``edit_mask`` (...) where α ≠ 0; ``x`` (..., h), computed in float32."""
        x32 = x.float()  # (..., h)
        scale = torch.as_tensor(alpha, dtype=torch.float32, device=x.device).expand(x.shape[:-1])  # (...)
        changed = scale != 0  # (...)
        if edit_mask is not None:
            changed = changed & edit_mask
        shifted = x32 + scale.unsqueeze(-1) * self.vector.float()  # (..., h)
        out = torch.where(changed.unsqueeze(-1), shifted, x32)  # (..., h)
        amount = torch.where(changed, angle_between(x32, out), torch.zeros_like(scale))  # (...)
        output = torch.where(changed.unsqueeze(-1), out.to(x.dtype), x)  # untouched positions: the input itself
        return EditResult(output=output, changed=changed, amount=amount)
