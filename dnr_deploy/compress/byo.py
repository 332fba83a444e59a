"""Bring your own model and data through the Python API: what `dnr_deploy.compress(config,
model=..., train_data=..., test_data=...)` and `export_run(config, model=...)` add to the CLI.

The run dir has the CLI's format. A module passed as `model` is recorded by `config.model` when
that is a `MODULE:FACTORY` or `torchvision:NAME` spec building the same parameters, else as
`<module: package.Class>`, a name no stage can build: export and resume take the module again.
Either way it sits behind the dataset's normalization, as every built model does.

Data stand in for the splits of `config.dataset`, whose spec (image shape, class count,
mean/std, threat model) the run records. Export's parity gate and verify read that dataset's
test split, or `test_data` given to `export_run` and `verify` again. A DataLoader is read for
its dataset; batches and their order come from the config (seeded, so that a resumed run sees
the same batches).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from dnr_deploy.compress.distributed import DistContext
from dnr_deploy.compress.training import CompressConfig, ConfigError
from dnr_deploy.data import SPECS, DataBundle, DataError, DatasetSpec, parse_dataset
from dnr_deploy.models import ModelSpecError, create_model
from dnr_deploy.models.external import (
    check_runs_at,
    is_external_spec,
    is_module_record,
    module_record,
)
from dnr_deploy.models.registry import Normalize
from dnr_deploy.vocabulary import DatasetName

SPLITS = ("train", "test")


def resolve_config(config: CompressConfig, module: nn.Module | None) -> CompressConfig:
    """`config.resolved()`, its `model` saying what `module` is when one is passed: the spec
    `config.model` if it is an external one, else `module`'s record.

    Raises:
        ConfigError: as `resolved`; `module` is not an nn.Module; a spec whose parameters are
            not `module`'s; no module for a config that records one (resuming such a run).
    """
    if module is None:
        return config.resolved()
    if not isinstance(module, nn.Module):
        raise ConfigError(f"model must be an nn.Module instance, got {type(module).__name__}; "
                          "name an architecture with CompressConfig(model=...) instead")
    if is_external_spec(config.model) and not is_module_record(config.model):
        resolved = config.resolved()
        _check_spec_builds(module, resolved)
        return resolved
    return resolve_recorded(dataclasses.replace(config, model=module_record(module)))


def resolve_recorded(config: CompressConfig) -> CompressConfig:
    """`config.resolved()` for a config whose model may be a module's record (a checkpoint's),
    which is kept as it is: there is nothing to check it against."""
    if not is_module_record(config.model):
        return config.resolved()
    placeholder = dataclasses.replace(config, model=CompressConfig().model)
    return dataclasses.replace(placeholder.resolved(), model=config.model)


def _check_spec_builds(module: nn.Module, config: CompressConfig) -> None:
    if config.dataset == DatasetName.FOLDER.value:
        return  # its classes are known once it is read: `training_model` checks the module
    spec = SPECS[parse_dataset(config.dataset)]
    built = create_model(config.model, spec.num_classes, spec.input_shape[0], spec.mean,
                         spec.std)
    problem = state_mismatch(wrap_module(module, spec), built.state_dict())
    if problem:
        raise ConfigError(
            f"model= is not what {config.model!r} builds ({problem}): pass what the spec builds, "
            "or leave CompressConfig.model at its default so that the run records the module")


def wrap_module(module: nn.Module, spec: DatasetSpec | dict) -> nn.Module:
    """`module` behind the dataset's normalization, as `create_model` builds every model
    (`spec`: a DatasetSpec, or a run.json with "mean" and "std")."""
    mean, std = (spec["mean"], spec["std"]) if isinstance(spec, dict) else (spec.mean, spec.std)
    return nn.Sequential(Normalize(mean, std), module)


def training_model(module: nn.Module, config: CompressConfig, spec: DatasetSpec) -> nn.Module:
    """The network a run trains for `module` (trained in place: `module` ends holding the
    run's final masked weights).

    Raises:
        ConfigError: it fails on the dataset's images or gives other than one logit a class.
    """
    model = wrap_module(module, spec)
    try:
        check_runs_at(model, spec.input_shape, config.model, spec.num_classes)
    except ModelSpecError as err:
        raise ConfigError(str(err)) from None
    return model


def state_mismatch(model: nn.Module, state: dict) -> str:
    """What keeps `state` from loading into `model` ('' when nothing): the first missing,
    unexpected or differently shaped entries."""
    own = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    theirs = {name: tuple(t.shape) for name, t in state.items()}
    problems = [f"missing {n}" for n in own if n not in theirs]
    problems += [f"unexpected {n}" for n in theirs if n not in own]
    problems += [f"{n} is {theirs[n]}, not {own[n]}" for n in own
                 if n in theirs and own[n] != theirs[n]]
    more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
    return "; ".join(problems[:3]) + more


def with_data(config: CompressConfig, train_data: object, test_data: object,
              load: Callable[..., DataBundle]) -> DataBundle:
    """The splits of `config.dataset` (read by `load`, `data.load_data`, unless both are
    passed), with each split passed in put in its place.

    Raises:
        DataError: a split that is not a map-style Dataset (or a DataLoader over one) of
            (float32 image of the dataset's shape in [0, 1], label below its class count).
        ConfigError: a training DataLoader whose batch size is not the config's.
    """
    given = {"train": train_data, "test": test_data}
    if config.dataset == DatasetName.FOLDER.value:
        if any(data is not None for data in given.values()):
            raise DataError("dataset 'folder' reads both splits from data_dir; pass train_data "
                            "and test_data with the dataset of their shape instead")
        from dnr_deploy.data.folder import options_from_config

        return load(config.dataset, config.data_dir, options_from_config(config))
    if all(data is None for data in given.values()):
        return load(config.dataset, config.data_dir)
    spec = SPECS[parse_dataset(config.dataset)]
    both = all(data is not None for data in given.values())
    bundle = None if both else load(config.dataset, config.data_dir)
    splits = {split: getattr(bundle, split) if data is None
              else _as_dataset(data, split, spec, config) for split, data in given.items()}
    passed = tuple(split for split in SPLITS if given[split] is not None)
    return DataBundle(splits["train"], splits["test"], spec, passed)


def api_test_split(dataset: str, test_data: object) -> DataBundle:
    """`test_data` as the test split of `dataset`, for export's parity gate and verify (the
    spec checks its first item as compress does); no training split.

    Raises:
        DataError: as `with_data`, or an unknown dataset name.
    """
    if dataset == DatasetName.FOLDER.value:
        raise DataError("a run on an image folder reads its test split from that folder; pass "
                        "--data-dir (data_dir=) where it is, not test_data")
    spec = SPECS[parse_dataset(dataset)]
    return DataBundle(None, _as_dataset(test_data, "test", spec, None), spec, ("test",))


def check_distributed(context: DistContext, train_data: object, test_data: object) -> None:
    """Raises:
        ConfigError: a DataLoader under torchrun (its sampler would not shard the data)."""
    if context.enabled and any(isinstance(d, DataLoader) for d in (train_data, test_data)):
        raise ConfigError("under torchrun, pass train_data and test_data as Datasets: each rank "
                          "reads its own shard of them, which a DataLoader's sampler would not")


def _as_dataset(data: object, split: str, spec: DatasetSpec,
                config: CompressConfig | None) -> Dataset:
    name = f"{split}_data"
    if isinstance(data, DataLoader):
        if split == "train" and data.batch_size != config.batch_size:
            raise ConfigError(
                f"train_data is a DataLoader of batches of {data.batch_size}, the config's "
                f"batch_size is {config.batch_size}: the run draws its own batches of "
                "batch_size (seeded, so a resume sees the same ones); make them agree")
        data = data.dataset
    if isinstance(data, IterableDataset) or not (hasattr(data, "__getitem__")
                                                 and hasattr(data, "__len__")):
        raise DataError(f"{name} must be a map-style torch Dataset (indexable, with a length) "
                        f"or a DataLoader over one, got {type(data).__name__}")
    if len(data) == 0:
        raise DataError(f"{name} is empty")
    _check_sample(data[0], name, spec)
    return data


def _check_sample(sample: object, name: str, spec: DatasetSpec) -> None:
    """The first item stands for all: checking every image would read the whole dataset."""
    if not isinstance(sample, tuple | list) or len(sample) != 2:
        raise DataError(f"{name}[0] must be an (image, label) pair, got {type(sample).__name__}")
    image, label = sample
    shape = tuple(spec.input_shape)
    if not isinstance(image, torch.Tensor) or image.dtype != torch.float32 \
            or tuple(image.shape) != shape:
        got = (f"{image.dtype} {tuple(image.shape)}" if isinstance(image, torch.Tensor)
               else type(image).__name__)
        raise DataError(
            f"{name}[0]'s image must be a float32 tensor of {shape} (channels x height x width, "
            f"as the config's dataset has), got {got}; set CompressConfig(dataset=...) to a "
            "dataset of your images' shape")
    if image.numel() and not (float(image.min()) >= 0.0 and float(image.max()) <= 1.0):
        raise DataError(f"{name}[0]'s pixels span [{float(image.min()):.3g}, "
                        f"{float(image.max()):.3g}]; images enter every model in [0, 1] (the "
                        "model normalizes them itself)")
    integer = isinstance(label, int) and not isinstance(label, bool) or (
        isinstance(label, torch.Tensor) and label.dim() == 0 and not label.is_floating_point()
        and label.dtype != torch.bool)
    if not integer or not 0 <= int(label) < spec.num_classes:
        raise DataError(f"{name}[0]'s label must be an integer class in [0, "
                        f"{spec.num_classes}), got {label!r}")
