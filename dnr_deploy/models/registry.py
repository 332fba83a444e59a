"""Name -> builder registry, so a run can record a model as (name, kwargs) and any later stage
can rebuild the architecture without unpickling code."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn

from dnr_deploy.models.external import (
    WIDTH_SPEC,
    ModelSpecError,
    build_external,
    check_external_spec,
    check_runs_at,
    is_external_spec,
    is_module_record,
)

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


def check_model_spec(spec: str) -> None:
    """The one check every stage runs on a model spec (flag, recipe, run.json, manifest):
    a registered name, `torchvision:NAME` or `MODULE:FACTORY` (see `external.py`); the
    record of a module passed to the API (`<module: package.Class>`) is refused, saying why.

    Raises:
        ModelSpecError: the spec names nothing buildable, with the fix.
    """
    if not isinstance(spec, str):
        raise ModelSpecError(f"model spec must be a string, got {type(spec).__name__}")
    if is_module_record(spec):
        raise ModelSpecError(
            f"model {spec!r} is a module that was passed to dnr_deploy.compress(model=...), "
            "which nothing can rebuild from its name: pass a fresh instance again "
            "(export_run(config, model=...), or compress(config, model=...) to resume), or "
            "train with a MODULE:FACTORY spec that every stage can build"
        )
    if is_external_spec(spec):
        check_external_spec(spec)
    elif WIDTH_SPEC.fullmatch(spec):
        split_width(spec)
    elif spec not in _MODELS:
        raise ModelSpecError(
            f"unknown model {spec!r}; available: {', '.join(list_models())}, or "
            "torchvision:NAME, or MODULE:FACTORY"
        )


MAX_WIDTH = 64  # small:64 has ~1e9 weights: past that no CPU here trains it


def split_width(spec: str) -> tuple[str, int]:
    """`small:4` -> ("small", 4); a plain registry name -> (name, 1). The width multiplies
    every hidden layer's channels; it is part of the spec string, so run.json, the manifest
    and every later stage carry it with no extra field.

    Raises:
        ModelSpecError: an unknown name, a builder without a width, or a width out of range.
    """
    match = WIDTH_SPEC.fullmatch(spec)
    if match is None:
        return spec, 1
    name, width = match.group(1), int(match.group(2))
    if name not in _MODELS:
        raise ModelSpecError(f"unknown model {name!r} in {spec!r}; available: "
                             f"{', '.join(list_models())}")
    if "width" not in inspect.signature(_MODELS[name]).parameters:
        widened = [m for m in list_models()
                   if "width" in inspect.signature(_MODELS[m]).parameters]
        raise ModelSpecError(f"model {name!r} takes no width multiplier ({spec!r}); "
                             f"these do: {', '.join(widened)}")
    if not 1 <= width <= MAX_WIDTH:
        raise ModelSpecError(f"width in {spec!r} must be in [1, {MAX_WIDTH}], got {width}")
    return name, width


def create_model(
    name: str,
    num_classes: int,
    in_chans: int,
    mean: Sequence[float],
    std: Sequence[float],
    input_shape: Sequence[int] | None = None,
) -> nn.Module:
    """Build the model spec `name` with the dataset's normalization as its first module;
    with `input_shape`, also check that a zero image of that shape runs through it.

    Raises:
        ModelSpecError: `name` names nothing buildable, or the model fails at `input_shape`.
    """
    check_model_spec(name)
    if is_external_spec(name):
        body = build_external(name, num_classes, in_chans)
    else:
        builder_name, width = split_width(name)
        kwargs = {} if width == 1 else {"width": width}
        body = _MODELS[builder_name](num_classes=num_classes, in_chans=in_chans, **kwargs)
    model = nn.Sequential(Normalize(mean, std), body)
    if input_shape is not None:
        check_runs_at(model, input_shape, name)
    return model


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
