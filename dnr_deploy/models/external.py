"""Model specs beyond the registry's names: `torchvision:NAME` and a user's `MODULE:FACTORY`.

A spec is a plain string, so run.json records it like a built-in name and export rebuilds the
architecture from it; nothing is unpickled. `MODULE:FACTORY` imports MODULE, which runs the
user's own code: the same trust as `python -c "import MODULE"`. So a spec read from an artifact
(run.json, manifest, checkpoint) is built only when the user names the same spec or trusts
model code (`dnr_deploy.trust`, DESIGN.md section 9).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import torch
from torch import nn

from dnr_deploy.trust import (  # noqa: F401
    MODULE_RECORD,
    TORCHVISION_PREFIX,
    WIDTH_SPEC,
    is_module_record,
)

AUX_HEADS = ("googlenet", "inception_v3")  # torchvision classifiers with auxiliary heads


class ModelSpecError(ValueError):
    """A model spec that names nothing buildable, or a model that cannot run at the input size."""


def is_external_spec(spec: str) -> bool:
    """Built-in names (with or without `:WIDTH`) import nothing; every other spec with a colon
    names a module or a torchvision builder."""
    return ":" in spec and WIDTH_SPEC.fullmatch(spec) is None


def module_record(module: nn.Module) -> str:
    """The model name a run records for `module`: `<module: package.Class>`."""
    cls = type(module)
    return MODULE_RECORD.format(f"{cls.__module__}.{cls.__qualname__}")


def _split(spec: str) -> tuple[str, str]:
    module, _, attr = spec.partition(":")
    if not module or not attr or ":" in attr:
        raise ModelSpecError(
            f"model spec {spec!r} must be a built-in name, torchvision:NAME or MODULE:FACTORY"
        )
    return module, attr


def check_external_spec(spec: str) -> None:
    """Cheap checks that need no model: the torchvision name exists, the factory is callable.

    Raises:
        ModelSpecError: a malformed spec, an unknown torchvision name, a module that does not
            import, or a missing or non-callable factory.
    """
    if spec.startswith(TORCHVISION_PREFIX):
        _torchvision_name(spec)
    else:
        _factory(spec)


def _torchvision_name(spec: str) -> str:
    _, name = _split(spec)
    try:
        import torchvision.models
    except ImportError:
        raise ModelSpecError(f"model {spec!r} needs torchvision; pip install torchvision") from None
    if name not in torchvision.models.list_models():
        raise ModelSpecError(
            f"unknown torchvision model {name!r}; valid names: python -c \"import torchvision; "
            "print(torchvision.models.list_models())\""
        )
    return name


def _factory(spec: str):
    module_name, attr = _split(spec)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ModelSpecError(
            f"model {spec!r}: cannot import module {module_name!r} ({err}); it must be on "
            "PYTHONPATH"
        ) from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise ModelSpecError(f"model {spec!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(factory):
        raise ModelSpecError(f"model {spec!r}: {module_name}.{attr} is not callable")
    return factory


def build_external(spec: str, num_classes: int, in_chans: int) -> nn.Module:
    """The body of an external spec, with `num_classes` outputs and `in_chans` inputs.

    Raises:
        ModelSpecError: as `check_external_spec`, or a factory that fails or returns no
            nn.Module.
    """
    if spec.startswith(TORCHVISION_PREFIX):
        import torchvision.models

        name = _torchvision_name(spec)
        # GoogLeNet and Inception v3 return auxiliary logits in training mode, which neither
        # the hybrid loss nor the exported graph has a place for: build them without.
        extra = {"aux_logits": False} if name in AUX_HEADS else {}
        try:  # weights=None: never download; every run trains from scratch
            body = torchvision.models.get_model(name, weights=None, num_classes=num_classes,
                                                **extra)
        except (TypeError, ValueError) as err:
            raise ModelSpecError(f"torchvision model {name!r} cannot be built: {err}") from None
        return adapt_stem(body, in_chans, spec)
    factory = _factory(spec)
    try:
        body = factory(num_classes=num_classes, in_chans=in_chans)
    except Exception as err:  # the user's code: any failure is bad input, said in one line
        raise ModelSpecError(
            f"model {spec!r}: factory(num_classes={num_classes}, in_chans={in_chans}) failed: "
            f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
        ) from None
    if not isinstance(body, nn.Module):
        raise ModelSpecError(
            f"model {spec!r}: the factory returned {type(body).__name__}, not an nn.Module"
        )
    return body


def adapt_stem(body: nn.Module, in_chans: int, spec: str) -> nn.Module:
    """Replace the first Conv2d by one reading `in_chans` channels (torchvision models are
    built for RGB; the embedded digits are grayscale), every other setting kept."""
    for parent in body.modules():
        for child_name, conv in parent.named_children():
            if not isinstance(conv, nn.Conv2d):
                continue
            if conv.in_channels == in_chans:
                return body
            if conv.groups != 1:
                raise ModelSpecError(f"model {spec!r}: the first conv is grouped; its input "
                                     f"channels cannot be changed to {in_chans}")
            stem = nn.Conv2d(in_chans, conv.out_channels, conv.kernel_size, conv.stride,
                             conv.padding, conv.dilation, 1, conv.bias is not None,
                             conv.padding_mode)
            setattr(parent, child_name, stem)
            return body
    raise ModelSpecError(f"model {spec!r} has no Conv2d whose inputs could be set to {in_chans}")


def check_runs_at(model: nn.Module, input_shape: Sequence[int], spec: str,
                  num_classes: int | None = None) -> None:
    """One zero batch through `model` in eval mode (and two in training mode), so an
    architecture too deep for the dataset's images, or one whose training output is not a
    logits tensor, fails at build time, not mid-training.

    Raises:
        ModelSpecError: the forward pass fails or gives other than (1, classes) logits
            (`num_classes` of them, when given).
    """
    size = "x".join(str(n) for n in input_shape)
    try:
        out = _zeros_through(model, input_shape, 1, training=False, failure=(
            f"model {spec!r} cannot run at this dataset's input size {size} (channels x height "
            "x width)"))
    except ModelSpecError as err:
        side = smallest_side(model, input_shape[0])
        tried = "/".join(map(str, PROBE_SIDES))
        needs = (f"; of the square sizes {tried}, the smallest it runs at is {side}x{side}: "
                 "resize the images or use a dataset of that size" if side else
                 f"; it runs at none of the square sizes {tried} either")
        raise ModelSpecError(f"{err}{needs}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelSpecError(f"model {spec!r} must return (batch, classes) logits, got {got}")
    if num_classes is not None and out.shape[1] != num_classes:
        raise ModelSpecError(f"model {spec!r} gives {out.shape[1]} logits; the dataset has "
                             f"{num_classes} classes")
    _check_training_output(model, input_shape, spec)


def _check_training_output(model: nn.Module, input_shape: Sequence[int], spec: str) -> None:
    """Training mode may return something else (GoogLeNet's auxiliary logits), which the
    hybrid loss cannot take: say so before training. Two images, since batch norm needs more
    than one value per channel; the running statistics are put back."""
    out = _zeros_through(model, input_shape, 2, training=True, failure=(
        f"model {spec!r} runs in eval mode but fails in training mode"))
    if not isinstance(out, torch.Tensor):
        raise ModelSpecError(
            f"model {spec!r} returns {type(out).__name__} in training mode, not one logits "
            "tensor: build it without auxiliary outputs (for torchvision, aux_logits=False)")


# Square image sides tried when a model fails at the dataset's size: CIFAR's, Inception's
# minimum, ImageNet's and Inception's native sizes among them.
PROBE_SIDES = (16, 32, 64, 75, 96, 128, 224, 299)


def smallest_side(model: nn.Module, in_chans: int) -> int | None:
    """The smallest of `PROBE_SIDES` at which `model` runs in eval mode, or None: what to tell
    a user whose images are too small for the architecture."""
    for side in PROBE_SIDES:
        try:
            _zeros_through(model, (in_chans, side, side), 1, training=False, failure="")
        except ModelSpecError:
            continue
        return side
    return None


def _zeros_through(model: nn.Module, input_shape: Sequence[int], batch: int, training: bool,
                   failure: str) -> object:
    """`model`'s output for a batch of zero images in the given mode; the model's mode and
    buffers (batch-norm running statistics) are left as they were.

    Raises:
        ModelSpecError: `failure`, then the error's type and first words.
    """
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    was_training = model.training
    model.train(training)
    try:
        with torch.no_grad():
            return model(torch.zeros(batch, *input_shape))
    except Exception as err:  # any failure of a user's forward is the same bad input
        raise ModelSpecError(
            f"{failure}: {type(err).__name__}: {' '.join(str(err).split())[:200]}") from None
    finally:
        model.train(was_training)
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.copy_(buffers[name])
