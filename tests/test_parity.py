"""The parity limit: float32 rounding measured on the network itself, so a network whose
activations dwarf its logits is not failed for rounding, and a real difference still is."""

import numpy as np
import pytest
import torch
from torch import nn

from dnr_deploy.parity import float64_gap, parity_limit


class Cancelling(nn.Module):
    """(big + 1) - big with big ~ 1e8: float32 loses the 1 that float64 keeps, the way large
    intermediate activations make a deep network's float32 logits inexact."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0e8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        big = x * self.scale
        return (big + 1) - big


class Float32Only(nn.Module):
    """Keeps a float32 tensor outside its state, so a float64 copy cannot run."""

    def __init__(self) -> None:
        super().__init__()
        self.fixed = torch.ones(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.fixed


def logits_of(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(x).numpy()


def test_rounding_is_measured_against_float64():
    x = torch.rand(64, 3, generator=torch.Generator().manual_seed(0)) + 0.5
    cancelling = Cancelling()
    gap = float64_gap(cancelling, x, logits_of(cancelling, x))
    assert 0.5 < gap <= 8.0  # float32's ulp at 1e8 is 8: the "+ 1" is lost or rounded up
    linear = nn.Linear(3, 2)
    assert float64_gap(linear, x, logits_of(linear, x)) < 1e-5
    assert float64_gap(Float32Only(), x, logits_of(Float32Only(), x)) is None


def test_limit_takes_the_larger_of_logit_scale_and_rounding():
    x = torch.rand(64, 3, generator=torch.Generator().manual_seed(0)) + 0.5
    model = Cancelling()
    logits = logits_of(model, x)
    limit = parity_limit(model, x, logits, atol=1e-4, rtol=1e-6, rounding_factor=10)
    assert limit.limit == pytest.approx(1e-4 + 10 * limit.rounding)
    assert "float32 rounding" in limit.describe()
    # logits of a few units allow a few 1e-6 by rtol alone: only the rounding term allows more
    by_rtol = parity_limit(model, x, logits, 1e-4, 1e-6, 0).limit
    assert by_rtol == pytest.approx(1e-4 + 1e-6 * np.abs(logits).max()) and by_rtol < 1e-3
    # a model that cannot run in float64 falls back to rtol, and says so
    fixed = Float32Only()
    fallback = parity_limit(fixed, x, logits_of(fixed, x), 1e-4, 1e-6, 10)
    assert fallback.rounding is None and "not measured" in fallback.describe()
    assert fallback.limit == pytest.approx(1e-4 + 1e-6 * np.abs(logits_of(fixed, x)).max())
