"""Export a finished run into a deploy dir (what `dnr-export` runs), and load one back.

Order of events: read the run (run.json, checkpoint with its masks re-applied: the "masked
network"); build every artifact in a hidden sibling folder; check each against the masked
network on test images (shrunk model within `shrink_atol`, CSR round trip exact, ONNX Runtime
within `parity_atol` with the same argmax on every image); write manifest.json; rename the
folder onto the target. Any failed check or error removes the folder: nothing partial is left.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from dnr_deploy import checkpoint as ckpt
from dnr_deploy.data import SPECS, load_data, parse_dataset, test_subset
from dnr_deploy.export import channel, csr, manifest
from dnr_deploy.export import onnx as onnx_io
from dnr_deploy.models import create_model, list_models
from dnr_deploy.report import count_macs
from dnr_deploy.sparsity.groups import ChannelLayout, find_channel_groups
from dnr_deploy.sparsity.masks import Granularity, Masks, apply_masks, prunable_weights

DEFAULT_OUT = "deploy"  # inside the run dir


class ExportFormat(str, Enum):
    ONNX = "onnx"  # model.onnx plus the PyTorch-loadable weights
    CSR = "csr"  # weights.csr.npz alone (irregular runs)


class ExportError(ValueError):
    """Bad input to an export: options, a run that cannot be exported, an occupied --out."""


class ExportCheckFailed(RuntimeError):
    """A check on the exported artifacts failed (parity gate, CSR round trip, onnx.checker);
    nothing was written."""


@dataclass
class ExportConfig:
    """Every setting of an export; the only place their defaults are written."""

    run_dir: str | None = None  # None: the latest run recorded in runs/LATEST
    out: str | None = None  # None: RUN_DIR/deploy
    format: str = ExportFormat.ONNX.value
    baseline: bool = False  # also write baseline.onnx, the unpruned architecture
    force: bool = False  # replace a non-empty --out
    parity_samples: int = 512  # test images for every parity check
    data_dir: str | None = None  # None: the run's own --data-dir
    opset: int = 18
    parity_atol: float = 1e-4  # ONNX Runtime vs PyTorch, max |logit difference|
    shrink_atol: float = 1e-5  # shrunk vs masked network, max |logit difference|

    def validated(self) -> ExportConfig:
        """Raises:
            ExportError: an unknown format or a value out of range, with the allowed values."""
        formats = [f.value for f in ExportFormat]
        if self.format not in formats:
            raise ExportError(f"unknown format {self.format!r}; available: {', '.join(formats)}")
        if self.parity_samples < 1:
            raise ExportError(f"parity_samples must be at least 1, got {self.parity_samples}")
        if not 17 <= self.opset <= 23:
            raise ExportError(f"opset must be in 17..23 (ONNX Runtime 1.18+), got {self.opset}")
        for name in ("parity_atol", "shrink_atol"):
            if not getattr(self, name) > 0:
                raise ExportError(f"{name} must be positive, got {getattr(self, name)}")
        return self


@dataclass
class DeployResult:
    dir: Path
    manifest: dict


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


def load_source(run_dir: Path) -> SourceRun:
    """Rebuild the masked network of `run_dir` from run.json and checkpoint.pt.

    Raises:
        CheckpointError: not a finished run dir, an unreadable checkpoint, a checkpoint changed
            after run.json was written, or one that does not fit run.json's model.
        ExportError: an unknown granularity or model, or masks that cannot be deployed.
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
        if spec["name"] not in list_models():
            raise ExportError(f"run.json names the model {spec['name']!r}; this version knows "
                              f"{', '.join(list_models())}")
        model = create_model(spec["name"], int(spec["num_classes"]), int(spec["in_chans"]),
                             run["mean"], run["std"])
        model.load_state_dict(state["model"])
    except (KeyError, TypeError) as err:
        raise ckpt.CheckpointError(
            f"{str(run_dir)!r}: run.json or checkpoint lacks {err}") from None
    except RuntimeError as err:
        raise ckpt.CheckpointError(
            f"checkpoint weights do not fit run.json's model: {str(err).splitlines()[0]}"
        ) from None
    example = torch.zeros(1, *shape)
    kinds = [g.value for g in Granularity] + ["dense"]
    kind = run.get("granularity")
    if kind not in kinds:
        raise ExportError(f"run.json granularity {kind!r} is unknown; known: {', '.join(kinds)}")
    source = SourceRun(run_dir, run, model.eval(), None if kind == "dense" else Granularity(kind),
                       example, {})
    policy = state.get("policy") or {}
    try:
        if source.granularity is Granularity.IRREGULAR:
            source.masks = _irregular_masks(model, policy["masks"])
        elif source.granularity is Granularity.CHANNEL:
            groups = find_channel_groups(model, example)
            channel.check_channel_masks(groups, policy["channel_masks"])
            source.layout = ChannelLayout(model, groups)
            source.channel_masks = policy["channel_masks"]
            source.masks = source.layout.param_masks(source.channel_masks)
    except KeyError as err:
        raise ckpt.CheckpointError(f"checkpoint policy state lacks {err}") from None
    except channel.ShrinkError as err:
        raise ExportError(str(err)) from None
    apply_masks(model, source.masks)
    return source


def _check_run_fits_dataset(run: dict, run_dir: Path) -> None:
    """run.json's shapes size the model and the test images, so they must be its dataset's.

    Raises:
        ExportError: an unknown dataset.
        CheckpointError: a shape or class count other than the dataset's (a damaged run.json).
    """
    settings = run.get("config") or {}
    try:
        spec = SPECS[parse_dataset(str(settings.get("dataset")))]
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


def export_run(config: ExportConfig) -> DeployResult:
    """Export the run `config` names into a checked deploy dir. `dnr-export` does exactly this.

    Raises:
        ExportError, CheckpointError, DataError: bad input; nothing is written.
        ExportCheckFailed: a parity gate or artifact check failed; nothing is written.
    """
    start = time.perf_counter()
    config = config.validated()
    run_dir = Path(config.run_dir) if config.run_dir else ckpt.latest_run()
    source = load_source(run_dir)
    fmt = ExportFormat(config.format)
    if fmt is ExportFormat.CSR and source.granularity is not Granularity.IRREGULAR:
        raise ExportError(
            f"--format csr stores irregular sparsity; this is a {_granularity_name(source)} run, "
            "whose deployable form is a dense network: use --format onnx"
        )
    # Absolute, so "--out ." names a folder and the temporary sibling lands beside it.
    out = (Path(config.out) if config.out else run_dir / DEFAULT_OUT).absolute()
    _check_out(out, run_dir, config.force)
    # Test images for the parity gates (a CSR bundle alone is checked bit for bit instead).
    needs_images = fmt is ExportFormat.ONNX or config.baseline
    x = _test_images(source.run, config) if needs_images else None
    reference = onnx_io.torch_logits(source.model, x) if needs_images else None
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        if source.granularity is Granularity.IRREGULAR:
            deployed, parity, extra = _build_irregular(source, x, reference, work, fmt, config)
        else:
            deployed, parity, extra = _build_dense_net(source, x, reference, work, config)
        if config.baseline:
            baseline = work / onnx_io.BASELINE_NAME
            if not baseline.exists():  # an irregular build already kept its dense ONNX
                _write_onnx(source.model, source.example, baseline, config)
            parity["baseline_vs_torch_max_abs"] = _gate(
                baseline, x, reference, config.parity_atol).max_abs
        if needs_images:
            parity["n_images"] = len(x)
        figures = {**_size_figures(source, deployed), **extra, "parity": parity,
                   "export_seconds": round(time.perf_counter() - start, 3)}
        info = manifest.build_manifest(run_dir, source.run, figures, fmt.value, config.opset)
        manifest.write_manifest(work, info)
        manifest.load_manifest(work)  # what later stages will check, before anyone can see it
        _open_permissions(work)
        _move_into_place(work, out, config.force)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return DeployResult(out, manifest.load_manifest(out))


def _granularity_name(source: SourceRun) -> str:
    return source.granularity.value if source.granularity else "dense"


def _build_dense_net(source, x, reference, work, config) -> tuple[nn.Module, dict, dict]:
    """Channel and dense runs: a dense network (shrunk for channel runs) as ONNX + weights."""
    if source.granularity is Granularity.CHANNEL:
        groups = list(source.layout.groups.values())
        net, history = channel.shrink_model(source.model, groups, source.channel_masks,
                                            source.example)
        check = onnx_io.compare_logits(reference, onnx_io.torch_logits(net, x))
        if not check.passes(config.shrink_atol):
            raise ExportCheckFailed(
                f"the shrunk network differs from the masked one by up to {check.max_abs:.3g} "
                f"(limit {config.shrink_atol:g}) on {check.n_images} test images; an off unit "
                "was not exactly zero; nothing was written")
        parity = {"shrunk_vs_masked_max_abs": check.max_abs}
    else:
        net, history, parity = source.model, [], {}
    channel.save_state(work, net, history)
    _write_onnx(net, source.example, work / onnx_io.ONNX_NAME, config)
    result = _gate(work / onnx_io.ONNX_NAME, x, reference, config.parity_atol)
    parity.update(onnx_vs_torch_max_abs=result.max_abs, argmax_agree=result.argmax_agree)
    return net, parity, {}


def _build_irregular(source, x, reference, work, fmt, config) -> tuple[nn.Module, dict, dict]:
    """Irregular runs: the CSR bundle (round trip checked exactly), then the sparse ONNX."""
    header = {key: source.run[key] for key in ("model", "input_shape", "mean", "std")}
    state = source.model.state_dict()
    bundle = work / csr.CSR_NAME
    csr.write_csr_bundle(bundle, state, sorted(source.masks), header)
    _, restored = csr.read_csr_bundle(bundle)
    changed = [n for n, t in state.items() if n not in restored or not torch.equal(t, restored[n])]
    if changed or set(restored) != set(state):
        raise ExportCheckFailed(f"CSR round trip is not exact for {changed[:5]}; nothing written")
    parity: dict = {"csr_round_trip_exact": True}
    extra: dict = {}
    if fmt is ExportFormat.ONNX:
        path = work / onnx_io.ONNX_NAME
        _write_onnx(source.model, source.example, path, config)
        if config.baseline:  # the same network with dense initializers: the baseline
            shutil.copyfile(path, work / onnx_io.BASELINE_NAME)
        # The very last transformation: the exporter's optimizer would not keep sparse tensors.
        extra["sparse_initializers"] = onnx_io.sparsify_initializers(path, set(source.masks))
        result = _gate(path, x, reference, config.parity_atol)
        parity.update(onnx_vs_torch_max_abs=result.max_abs, argmax_agree=result.argmax_agree)
    return source.model, parity, extra


def _size_figures(source: SourceRun, deployed: nn.Module) -> dict:
    """Parameters and MACs (torch-pruning's counter) of the dense and the deployed network.

    Irregular runs deploy the full architecture, so their deployed MACs equal the dense ones
    (ONNX Runtime densifies sparse initializers at load); "nonzero_deployed" is what a sparse
    kernel would do, counted over the Conv2d and Linear layers like "conv_linear_dense".
    """
    dense_params = sum(p.numel() for p in source.model.parameters())
    dense_macs = int(tp.utils.count_ops_and_params(source.model, source.example)[0])
    if source.granularity is Granularity.IRREGULAR:
        zeros = sum(int((~mask).sum()) for mask in source.masks.values())
        macs = {"dense": dense_macs, "deployed": dense_macs,
                "nonzero_deployed": count_macs(source.model, source.example, nonzero_only=True),
                "conv_linear_dense": count_macs(source.model, source.example)}
        return {"params": {"dense": dense_params, "deployed": dense_params - zeros},
                "macs": macs}
    deployed_macs = int(tp.utils.count_ops_and_params(deployed, source.example)[0])
    return {"params": {"dense": dense_params,
                       "deployed": sum(p.numel() for p in deployed.parameters())},
            "macs": {"dense": dense_macs, "deployed": deployed_macs}}


def _write_onnx(model: nn.Module, example: torch.Tensor, path: Path, config) -> None:
    onnx_io.export_onnx(model, example, path, config.opset)


def _gate(path: Path, x: torch.Tensor, reference: np.ndarray, atol: float) -> onnx_io.Parity:
    """onnx.checker, then ONNX Runtime against the masked PyTorch network.

    Raises:
        ExportCheckFailed: invalid ONNX, a logit further than `atol`, or a different argmax.
    """
    import onnx

    try:
        onnx_io.check_onnx(path)
    except onnx.checker.ValidationError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "invalid"
        raise ExportCheckFailed(f"{path.name} fails onnx.checker: {first}") from None
    result = onnx_io.compare_logits(reference, onnx_io.run_session(onnx_io.open_session(path), x))
    if not result.passes(atol):
        raise ExportCheckFailed(
            f"parity gate failed for {path.name}: ONNX Runtime differs from PyTorch by up to "
            f"{result.max_abs:.3g} (limit {atol:g}), same argmax on {result.argmax_agree}/"
            f"{result.n_images} test images; nothing was written"
        )
    return result


def _test_images(run: dict, config: ExportConfig) -> torch.Tensor:
    """The run's first `parity_samples` test images (DataError says what to put where)."""
    settings = run.get("config") or {}
    try:
        dataset = parse_dataset(str(settings.get("dataset")))
    except ValueError as err:
        raise ExportError(f"run.json: {err}") from None
    bundle = load_data(dataset.value, config.data_dir or settings.get("data_dir"))
    x, _ = test_subset(bundle, config.parity_samples)
    return x


def _is_within(inner: Path, outer: Path) -> bool:
    inner, outer = inner.resolve(), outer.resolve()
    return inner == outer or outer in inner.parents


def _check_out(out: Path, run_dir: Path, force: bool) -> None:
    if _is_within(run_dir, out):
        raise ExportError(f"--out {str(out)!r} holds the run dir itself; choose another folder")
    occupied = out.exists() and (not out.is_dir() or any(out.iterdir()))
    if occupied and not force:
        raise ExportError(f"--out {str(out)!r} exists and is not empty; "
                          "pass --force to replace it")


def _open_permissions(folder: Path) -> None:
    """Give the finished folder the umask's usual modes: mkdtemp and the atomic writes create
    owner-only files, but a deploy dir is meant to be shared."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for file in folder.iterdir():
        os.chmod(file, 0o666 & ~umask)


def _move_into_place(work: Path, out: Path, force: bool) -> None:
    """Rename the finished folder onto `out` in one step, so `out` is never partial.

    rename(2) replaces only an absent or empty folder and fails on a non-empty one: that is
    what makes two exports racing to the same `out` safe. The first rename wins; the other
    export fails with ExportError and leaves the winner's folder untouched, so `out` is never
    a mix of both. With `force`, an existing `out` is set aside first and deleted once the
    new one is in place (a crash between the two renames leaves it as `.NAME.old-*`).

    Raises:
        ExportError: `out` was filled while this export ran (without `force`), or another
            forced export replaced it at the same moment; this export's folder is dropped.
    """
    try:
        os.rename(work, out)
        return
    except OSError as err:
        if err.errno not in _OCCUPIED:
            raise
        if not force:
            raise ExportError(
                f"--out {str(out)!r} was filled while this export ran (another dnr-export?); "
                "it was left as it is and nothing was written; pass --force to replace it"
            ) from None
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(out, old)
    try:
        os.rename(work, out)
    except OSError as err:
        if err.errno not in _OCCUPIED:
            os.rename(old, out)  # put the previous deploy dir back
            raise
        _remove(old)  # replaced anyway, by the export that won
        raise ExportError(f"another export replaced --out {str(out)!r} at the same moment; "
                          "its deploy dir was kept and this one dropped") from None
    _remove(old)


# What rename(2) reports when the target is taken: a non-empty folder, or not a folder.
_OCCUPIED = (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def load_deployed_model(deploy_dir: str | Path, verify: bool = True) -> nn.Module:
    """A PyTorch model (eval mode) rebuilt from a deploy dir, with nothing unpickled.

    Irregular runs load from the CSR bundle; channel and dense runs replay the pruning history
    on a freshly built architecture, then load the state dict.

    Raises:
        ManifestError: not a deploy dir, a file that fails its sha256 (when `verify`), or
            weights that do not fit the recorded architecture.
    """
    deploy_dir = Path(deploy_dir)
    info = manifest.load_manifest(deploy_dir)
    files = info["files"]
    names = [csr.CSR_NAME] if csr.CSR_NAME in files else [channel.WEIGHTS_NAME,
                                                           channel.HISTORY_NAME]
    if verify:
        manifest.verify_files(deploy_dir, info, names)
    spec = info["model"]
    if spec["name"] not in list_models():
        raise manifest.ManifestError(f"the manifest names the model {spec['name']!r}; this "
                                     f"version knows {', '.join(list_models())}")
    chans = spec["in_chans"]
    if len(info.get("mean") or []) != chans or len(info.get("std") or []) != chans:
        raise manifest.ManifestError(f"the manifest's mean and std must hold {chans} values "
                                     f"(one per input channel); re-export the run")
    model = create_model(spec["name"], spec["num_classes"], chans, info["mean"], info["std"])
    try:
        shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        if csr.CSR_NAME in files:
            _, state = csr.read_csr_bundle(deploy_dir / csr.CSR_NAME, shapes)
        else:  # a shrunk model is smaller than the full one: the same bound holds
            state, history = channel.load_state(deploy_dir, csr.weights_bytes_limit(shapes))
            if history:
                channel.replay_pruning(model, history, torch.zeros(1, *info["input_shape"]))
        model.load_state_dict(state)
    except (csr.CsrError, channel.ShrinkError) as err:
        raise manifest.ManifestError(str(err)) from None
    except (AttributeError, IndexError, KeyError, RuntimeError, ValueError) as err:
        raise manifest.ManifestError(
            f"the weights in {str(deploy_dir)!r} do not fit a {spec['name']!r}: "
            f"{' '.join(str(err).split())[:300] or type(err).__name__}"
        ) from None
    return model.eval()

