"""The rule export's parity gate and verify's fidelity check share: how far two float32
implementations of one network may differ before the difference means a bug, not rounding.

Rounding grows with a network's intermediate activations, not with its logits. A one-epoch
efficientnet_b0 on the digits has activations up to 4.2e5 and logits up to 1.1e4; on the same
images PyTorch's float32 logits are 0.34 from the float64 ones, and ONNX Runtime's 1.70 (2.04
from PyTorch's). No fraction of the logits separates that from an export bug; the network's own
float32 error does. So the limit is `atol` plus the larger of `rtol` x the largest |logit| and
`rounding_factor` x the reference's largest |float32 - float64| logit on the same images.
A real export bug (a wrong weight, op or layout) moves logits by a sizeable fraction of their
scale, far beyond either.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy and torch load when a limit is measured: the settings modules that
    import numpy as np  # read the defaults below must not import them (fast --help)
    import torch
    from torch import nn

# The defaults of both checks: export's gate and verify's fidelity check hold one rule.
PARITY_ATOL = 1e-4
PARITY_RTOL = 1e-6
ROUNDING_FACTOR = 10.0
# Their allowed values (config.Bounds notation), checked where each stage validates its config.
PARITY_RTOL_BOUNDS = "[0, 1)"
ROUNDING_FACTOR_BOUNDS = "[0, 1000]"




@dataclass(frozen=True)
class ParityLimit:
    """The largest |logit difference| a check allows, and what it is made of."""

    atol: float
    rtol: float
    scale: float  # the largest |logit| of the reference
    rounding: float | None  # the reference's largest |float32 - float64| logit; None: unknown
    rounding_factor: float

    @property
    def limit(self) -> float:
        return self.atol + max(self.rtol * self.scale, self.rounding_factor * (self.rounding or 0))

    def describe(self) -> str:
        rounding = ("its float64 gap not measured" if self.rounding is None else
                    f"{self.rounding_factor:g} x its float32 rounding {self.rounding:.3g}")
        return (f"limit {self.limit:.3g}: {self.atol:g} + the larger of {self.rtol:g} x largest "
                f"|logit| {self.scale:.3g} and {rounding}")

    def record(self) -> dict:
        """The figures a manifest or report keeps."""
        return {"atol": self.atol, "rtol": self.rtol, "float32_rounding": self.rounding,
                "rounding_factor": self.rounding_factor, "limit": self.limit}


def parity_limit(model: nn.Module, x: torch.Tensor, logits: np.ndarray, atol: float,
                 rtol: float, rounding_factor: float, batch_size: int = 256) -> ParityLimit:
    """The limit for comparisons against `logits`, `model`'s float32 logits of `x`."""
    import numpy as np

    scale = float(np.abs(logits).max()) if logits.size else 0.0
    rounding = float64_gap(model, x, logits, batch_size) if rounding_factor > 0 else None
    return ParityLimit(atol, rtol, scale, rounding, rounding_factor)


def float64_gap(model: nn.Module, x: torch.Tensor, logits: np.ndarray,
                batch_size: int = 256) -> float | None:
    """Largest |`logits` - the same network's logits in float64| over `x`: how much float32
    rounding moves this network's outputs. None when a copy cannot run in float64 (a module
    that makes float32 tensors of its own); the limit then rests on `rtol` alone."""
    import numpy as np
    import torch

    if not logits.size:
        return 0.0
    try:
        exact = copy.deepcopy(model).double().eval()
        with torch.no_grad():
            out = torch.cat([exact(x[start:start + batch_size].double())
                             for start in range(0, len(x), batch_size)])
    except Exception:  # any model that cannot run in float64: the limit rests on rtol alone
        return None
    if out.shape != logits.shape:
        return None
    return float(np.abs(out.numpy() - logits.astype(np.float64)).max())
