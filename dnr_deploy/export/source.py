"""The source of an export: a finished run's masked training network, rebuilt from its
run.json and checkpoint.pt with every mask re-applied (the function export must reproduce)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dnr_deploy.compress import byo
from dnr_deploy.compress import checkpoint as ckpt
from dnr_deploy.data import SPECS, parse_dataset
from dnr_deploy.data.folder import recorded_folder_spec
from dnr_deploy.export.errors import ExportError
from dnr_deploy.models import ModelSpecError, create_model
from dnr_deploy.sparsity import surgery
from dnr_deploy.sparsity.groups import ChannelGraphError, ChannelLayout, find_channel_groups
from dnr_deploy.sparsity.masks import (
    DENSE,
    Granularity,
    Masks,
    apply_masks,
    prunable_weights,
)
from dnr_deploy.trust import UntrustedModelCode, check_spec_trusted
from dnr_deploy.vocabulary import DatasetName


@dataclass
class SourceRun:
    """The masked training network of a finished run, and what its run.json says."""

    dir: Path
    run: dict
    model: nn.Module  # eval mode, every mask re-applied
    granularity: Granularity | None  # None: a dense run
    example: torch.Tensor
    masks: Masks  # parameter masks ({} for a dense run)
    layout: ChannelLayout | None = None
    channel_masks: dict | None = None


def load_source(run_dir: Path, model: nn.Module | None = None, model_spec: str | None = None,
                trust_model_code: bool = False) -> SourceRun:
    """Rebuild the masked network of `run_dir` from run.json and checkpoint.pt.

    Args:
        model: the architecture, given as a module (the one way for a run whose model was
            passed to `dnr_deploy.compress(model=...)`): the checkpoint is loaded into it, in
            place, behind the run's normalization, instead of into run.json's model.
        model_spec, trust_model_code: run.json's MODULE:FACTORY spec is imported only when
            the user names the same spec or trusts model code (`check_spec_trusted`).

    Raises:
        CheckpointError: not a finished run dir, an unreadable checkpoint, a checkpoint changed
            after run.json was written, or one that does not fit run.json's model.
        ExportError: an unknown granularity or model, a run.json model no stage can build (a
            module passed to the API) and no `model`, a `model` whose parameters do not fit
            the checkpoint, or masks that cannot be deployed.
    """
    if not run_dir.is_dir():
        raise ExportError(f"run dir {str(run_dir)!r} does not exist; name a dnr-compress run dir")
    run = ckpt.read_run_json(run_dir)
    state = ckpt.load_checkpoint(run_dir)
    recorded = run.get("checkpoint_sha256")
    if recorded and ckpt.sha256_of(run_dir / ckpt.CHECKPOINT_NAME) != recorded:
        raise ckpt.CheckpointError(
            f"{str(run_dir / ckpt.CHECKPOINT_NAME)!r} differs from the one run.json describes "
            "(sha256 mismatch): it was changed or damaged after the run finished"
        )
    _check_run_fits_dataset(run, run_dir)
    try:
        spec, shape = run["model"], [int(n) for n in run["input_shape"]]
        if model is None:
            check_spec_trusted(spec["name"], f"run.json of {str(run_dir)!r}", model_spec,
                               trust_model_code)
            model = create_model(spec["name"], int(spec["num_classes"]), int(spec["in_chans"]),
                                 run["mean"], run["std"])
        else:
            model = _given_model(model, run, state["model"], run_dir)
        model.load_state_dict(state["model"])
    except (KeyError, TypeError) as err:
        raise ckpt.CheckpointError(
            f"{str(run_dir)!r}: run.json or checkpoint lacks {err}") from None
    except UntrustedModelCode as err:
        raise ExportError(str(err)) from None
    except ModelSpecError as err:
        raise ExportError(f"run.json's model: {err}") from None
    except RuntimeError as err:
        raise ckpt.CheckpointError(
            f"checkpoint weights do not fit run.json's model: {str(err).splitlines()[0]}"
        ) from None
    example = torch.zeros(1, *shape)
    kinds = [g.value for g in Granularity] + [DENSE]
    kind = run.get("granularity")
    if kind not in kinds:
        raise ExportError(f"run.json granularity {kind!r} is unknown; known: {', '.join(kinds)}")
    source = SourceRun(run_dir, run, model.eval(), None if kind == DENSE else Granularity(kind),
                       example, {})
    policy = state.get("policy") or {}
    try:
        if source.granularity is Granularity.IRREGULAR:
            source.masks = _irregular_masks(model, policy["masks"])
        elif source.granularity is Granularity.CHANNEL:
            groups = find_channel_groups(model, example)
            surgery.check_channel_masks(groups, policy["channel_masks"])
            source.layout = ChannelLayout(model, groups)
            source.channel_masks = policy["channel_masks"]
            source.masks = source.layout.param_masks(source.channel_masks)
    except KeyError as err:
        raise ckpt.CheckpointError(f"checkpoint policy state lacks {err}") from None
    except (surgery.ShrinkError, ChannelGraphError) as err:
        raise ExportError(str(err)) from None
    apply_masks(model, source.masks)
    return source


def _given_model(model: nn.Module, run: dict, weights: dict, run_dir: Path) -> nn.Module:
    """`model` behind the run's normalization, checked to fit the checkpoint's weights."""
    if not isinstance(model, nn.Module):
        raise ExportError(f"model must be an nn.Module instance, got {type(model).__name__}")
    wrapped = byo.wrap_module(model, run)
    problem = byo.state_mismatch(wrapped, weights)
    if problem:
        raise ExportError(f"model= ({type(model).__name__}) does not fit the checkpoint of "
                          f"{str(run_dir)!r} (trained as {run['model']['name']!r}): {problem}")
    return wrapped


def _check_run_fits_dataset(run: dict, run_dir: Path) -> None:
    """run.json's shapes size the model and the test images, so they must be its dataset's.

    Raises:
        ExportError: an unknown dataset.
        CheckpointError: a shape or class count other than the dataset's (a damaged run.json).
    """
    settings = run.get("config") or {}
    try:
        dataset = parse_dataset(str(settings.get("dataset")))
        spec = SPECS[dataset] if dataset is not DatasetName.FOLDER else \
            recorded_folder_spec(run.get("dataset"))
    except ValueError as err:
        raise ExportError(f"run.json: {err}") from None
    model = run.get("model") or {}
    chans = spec.input_shape[0]
    recorded = {"input_shape": run.get("input_shape"), "num_classes": run.get("num_classes"),
                "model.num_classes": model.get("num_classes"),
                "model.in_chans": model.get("in_chans"),
                "len(mean)": len(run.get("mean") or []), "len(std)": len(run.get("std") or [])}
    expected = {"input_shape": list(spec.input_shape), "num_classes": spec.num_classes,
                "model.num_classes": spec.num_classes, "model.in_chans": chans,
                "len(mean)": chans, "len(std)": chans}
    for key, value in expected.items():
        if recorded[key] != value:
            raise ckpt.CheckpointError(
                f"{str(run_dir / ckpt.RUN_JSON)!r} records {key} {recorded[key]!r}, but its "
                f"dataset {settings.get('dataset')} has {value!r}: the run dir is damaged")


def _irregular_masks(model: nn.Module, masks: dict) -> Masks:
    weights = prunable_weights(model)
    if not masks:  # a magnitude-prune run that ended before its prune step: nothing is masked
        return {name: torch.ones_like(w, dtype=torch.bool) for name, w in weights.items()}
    for name, weight in weights.items():
        mask = masks.get(name)
        if mask is None or mask.dtype != torch.bool or mask.shape != weight.shape:
            raise ExportError(f"checkpoint mask for {name!r} is missing or not a bool "
                              f"{tuple(weight.shape)} tensor; the run is damaged")
    return {name: masks[name] for name in weights}
