"""In-place activations (lowbit.kernels.inplace_act): only where the graph proves nothing else reads the input."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.kernels.fold_bn import FoldedBatchNorm
from lowbit.kernels.inplace_act import inplace_activations_

GEN = torch.Generator().manual_seed(0)


class Sites(nn.Module):
    """``act`` after conv -> identity (safe) and after conv (safe); ``shared`` also on a residual (unsafe);
    ``first`` on the model input (unsafe: the caller's tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.ident, self.conv2, self.conv3 = nn.Conv2d(4, 4, 1), FoldedBatchNorm(4), nn.Conv2d(4, 4, 1), \
            nn.Conv2d(4, 4, 1)
        self.act, self.shared, self.first = nn.ReLU6(), nn.ReLU(), nn.Hardtanh(-1.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.ident(self.conv(self.first(x))))
        h = self.act(self.conv2(h))
        z = self.conv3(h)
        return self.shared(self.conv(h)) + self.shared(z) + z  # z is read twice


def test_only_proven_call_sites_become_inplace_and_outputs_are_equal() -> None:
    model = Sites()
    x = torch.randn(2, 4, 5, 5, generator=GEN) * 3
    x_before = x.clone()
    with torch.no_grad():
        before = model(x)
        assert inplace_activations_(model) == 1
        assert model.act.inplace and not model.shared.inplace and not model.first.inplace
        assert torch.equal(model(x), before) and torch.equal(x, x_before)  # the caller's input is untouched
        assert inplace_activations_(model) == 0  # idempotent
