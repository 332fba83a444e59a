"""Name -> builder registry, so a run can record a model as (name, kwargs) and any later stage
can rebuild the architecture without unpickling code."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn

ModelBuilder = Callable[..., nn.Module]
_MODELS: dict[str, ModelBuilder] = {}


def register_model(builder: ModelBuilder) -> ModelBuilder:
    """Decorator: file `builder` under its function name."""
    name = builder.__name__
    if name in _MODELS:
        warnings.warn(f"model {name!r} registered twice; the later builder wins", stacklevel=2)
    _MODELS[name] = builder
    return builder


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(
    name: str,
    num_classes: int,
    in_chans: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> nn.Module:
    """Build `name` with the dataset's normalization as its first module.

    Raises:
        KeyError: `name` is not a registered model.
    """
    if name not in _MODELS:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    body = _MODELS[name](num_classes=num_classes, in_chans=in_chans)
    return nn.Sequential(Normalize(mean, std), body)


class Normalize(nn.Module):
    """(x - mean) / std per channel. Living inside the model keeps attacks and eps in [0, 1]
    pixel space and makes the exported ONNX file self-contained."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        as_column = lambda v: torch.tensor(list(v), dtype=torch.float32).view(1, -1, 1, 1)  # noqa: E731
        self.register_buffer("mean", as_column(mean))
        self.register_buffer("std", as_column(std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std
