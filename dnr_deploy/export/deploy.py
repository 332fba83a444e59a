"""Export a finished run into a deploy dir (what `dnr-export` runs), and load one back.

Order of events: read the run (run.json, checkpoint with its masks re-applied: the "masked
network"); build every artifact in a hidden sibling folder; check each against the masked
network on test images (shrunk model within `shrink_atol`, CSR round trip exact, ONNX Runtime
within `parity_atol` with the same argmax on every image); write manifest.json; rename the
folder onto the target. Any failed check or error removes the folder: nothing partial is left.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dnr_deploy.compress import checkpoint as ckpt
from dnr_deploy.data import load_trained_data, parse_dataset, test_subset
from dnr_deploy.deploydir import manifest, names, signing
from dnr_deploy.deploydir.cross_check import check_deploy_graphs, measure_onnx_files
from dnr_deploy.export import channel, csr, sparse_int8
from dnr_deploy.export import onnx as onnx_io
from dnr_deploy.export.config import ExportConfig, ExportFormat  # noqa: F401  (re-exported)
from dnr_deploy.export.errors import ExportCheckFailed, ExportError
from dnr_deploy.export.source import SourceRun, load_source
from dnr_deploy.files import FolderTaken, publish_folder
from dnr_deploy.parity import ParityLimit, parity_limit
from dnr_deploy.progress import terminal_progress
from dnr_deploy.sizes import size_figures
from dnr_deploy.sparsity import surgery
from dnr_deploy.sparsity.masks import DENSE, Granularity


@dataclass
class DeployResult:
    dir: Path
    manifest: dict


def export_run(config: ExportConfig, model: nn.Module | None = None,
               test_data: object = None) -> DeployResult:
    """Export the run `config` names into a checked deploy dir. `dnr-export` does exactly this.

    Args:
        model: the run's architecture as a module, into which the checkpoint is loaded (in
            place) instead of rebuilding run.json's model: needed for a run trained on a
            module passed to `dnr_deploy.compress(model=...)` (`load_source`).
        test_data: a torch Dataset (or DataLoader) of the run dataset's image shape whose first
            `parity_samples` images the parity gates use instead of the dataset's test split
            (checked as `dnr_deploy.compress` checks it). int8 still calibrates on the dataset's
            training split.

    Raises:
        ExportError, CheckpointError, DataError: bad input; nothing is written.
        SignatureError: `config.sign` is not a usable private key; nothing is written.
        ExportCheckFailed: a parity gate or artifact check failed; nothing is written.
    """
    start = time.perf_counter()
    config = config.validated()
    run_dir = Path(config.run_dir) if config.run_dir else ckpt.latest_run()
    source = load_source(run_dir, model, config.model, config.trust_model_code)
    fmt = ExportFormat(config.format)
    if fmt is ExportFormat.CSR and source.granularity is not Granularity.IRREGULAR:
        raise ExportError(
            f"--format csr stores irregular sparsity; this is a {_granularity_name(source)} run, "
            "whose deployable form is a dense network: use --format onnx"
        )
    if config.quantize and source.granularity is Granularity.IRREGULAR and \
            fmt is not ExportFormat.ONNX:
        raise ExportError("--quantize int8 of an irregular run writes model.onnx beside the "
                          "int8 CSR weights: use --format onnx")
    # Absolute, so "--out ." names a folder and the temporary sibling lands beside it.
    out = (Path(config.out) if config.out else run_dir / names.DEFAULT_OUT).absolute()
    _check_out(out, run_dir, config.force)
    if config.sign:  # a bad key fails before minutes of building
        signing.check_private_key(config.sign, out)
    # Test images for the parity gates (a CSR bundle alone is checked bit for bit instead).
    needs_images = fmt is ExportFormat.ONNX or config.baseline
    bundle = _load_bundle(source.run, config) if needs_images and (
        test_data is None or config.quantize) else None
    images = _api_test_split(source.run, test_data) if test_data is not None else bundle
    x, y = test_subset(images, config.parity_samples) if needs_images else (None, None)
    reference = onnx_io.torch_logits(source.model, x) if needs_images else None
    if reference is not None:
        _check_finite(reference)
    limit = parity_limit(source.model, x, reference, config.parity_atol, config.parity_rtol,
                         config.parity_rounding_factor) if needs_images else None
    out.parent.mkdir(parents=True, exist_ok=True)
    say = terminal_progress("dnr-export: ") or (lambda line: None)
    say(f"building the {_granularity_name(source)} artifacts and their parity gates "
        f"({len(x) if x is not None else 0} test images)")
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        if source.granularity is Granularity.IRREGULAR:
            deployed, parity, extra = _build_irregular(source, x, reference, limit, work, fmt,
                                                       config)
            if config.quantize:  # a dense QDQ model.onnx plus weights.int8.npz (sparse_int8)
                say(f"int8: calibrating on {config.calibration_images} training images, "
                    "then its two gates and the int8 CSR weights")
                dense = sparse_int8.dense_float_graph(source.model, source.example, work,
                                                      config.opset)
                record = _quantize(work, bundle, x, y, reference, config, dense)
                dense.unlink()
                extra["quantization"] = sparse_int8.add_int8_csr(work, record)
        else:
            deployed, parity, extra = _build_dense_net(source, x, reference, limit, work, config)
            if config.quantize:
                say(f"int8: calibrating on {config.calibration_images} training images, "
                    "then its two gates")
                extra["quantization"] = _quantize(work, bundle, x, y, reference, config)
        if config.baseline:
            baseline = work / names.BASELINE_FILE
            say("baseline.onnx and its parity gate")
            if not baseline.exists():  # an irregular build already kept its dense ONNX
                _write_onnx(source.model, source.example, baseline, config)
            parity["baseline_vs_torch_max_abs"] = _gate(
                baseline, x, reference, limit).max_abs
        if needs_images:
            parity["n_images"] = len(x)
            parity["limit"] = limit.record()
        figures = {**_size_figures(source, deployed), **extra, "parity": parity,
                   "onnx_sizes": _onnx_sizes(work),
                   "export_seconds": round(time.perf_counter() - start, 3)}
        say("manifest.json: hashing every file, then checking it as the later stages will")
        info = manifest.build_manifest(run_dir, source.run, figures, fmt.value, config.opset)
        manifest.write_manifest(work, info)
        # what later stages will check, before anyone can see it
        check_deploy_graphs(work, manifest.load_manifest(work))
        if config.sign:  # no verdict inside: dnr-verify --sign adds it
            say("model.sig: signing every file (without a verdict)")
            signing.sign_deploy_dir(work, config.sign)
        try:
            publish_folder(work, out, config.force, manifest.check_replaceable)
        except manifest.ManifestError as err:
            raise ExportError(str(err)) from None
        except FolderTaken as err:
            raise ExportError(str(err)) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return DeployResult(out, manifest.load_manifest(out))


def _granularity_name(source: SourceRun) -> str:
    return source.granularity.value if source.granularity else DENSE


def _build_dense_net(source, x, reference, limit, work, config) -> tuple[nn.Module, dict, dict]:
    """Channel and dense runs: a dense network (shrunk for channel runs) as ONNX + weights."""
    if source.granularity is Granularity.CHANNEL:
        groups = list(source.layout.groups.values())
        net, history = surgery.shrink_model(source.model, groups, source.channel_masks,
                                            source.example)
        check = onnx_io.compare_logits(reference, onnx_io.torch_logits(net, x))
        # the same rule as the parity gate: a network whose activations dwarf its logits
        # rounds differently once its layers are narrower
        shrink_limit = dataclasses.replace(limit, atol=config.shrink_atol)
        if not check.passes(shrink_limit.limit):
            raise ExportCheckFailed(
                f"the shrunk network differs from the masked one by up to {check.max_abs:.3g} "
                f"({shrink_limit.describe()}) on {check.n_images} test images; an off unit "
                "was not exactly zero; nothing was written")
        parity = {"shrunk_vs_masked_max_abs": check.max_abs}
    else:
        net, history, parity = source.model, [], {}
    channel.save_state(work, net, history)
    _write_onnx(net, source.example, work / names.MODEL_FILE, config)
    result = _gate(work / names.MODEL_FILE, x, reference, limit)
    parity.update(onnx_vs_torch_max_abs=result.max_abs, argmax_agree=result.argmax_agree)
    return net, parity, {}


def _build_irregular(source, x, reference, limit, work, fmt,
                     config) -> tuple[nn.Module, dict, dict]:
    """Irregular runs: the CSR bundle (round trip checked exactly), then the sparse ONNX."""
    header = {key: source.run[key] for key in ("model", "input_shape", "mean", "std")}
    state = source.model.state_dict()
    bundle = work / names.CSR_FILE
    csr.write_csr_bundle(bundle, state, sorted(source.masks), header)
    _, restored = csr.read_csr_bundle(bundle)
    changed = [n for n, t in state.items() if n not in restored or not torch.equal(t, restored[n])]
    if changed or set(restored) != set(state):
        raise ExportCheckFailed(f"CSR round trip is not exact for {changed[:5]}; nothing written")
    parity: dict = {"csr_round_trip_exact": True}
    extra: dict = {}
    if fmt is ExportFormat.ONNX:
        path = work / names.MODEL_FILE
        external = _write_onnx(source.model, source.example, path, config, sparsified=True)
        if config.baseline and not external:  # the same network, dense initializers
            shutil.copyfile(path, work / names.BASELINE_FILE)
        # The very last transformation: the exporter's optimizer would not keep sparse tensors.
        try:
            extra["sparse_initializers"] = onnx_io.sparsify_initializers(path, set(source.masks))
        except ValueError as err:
            raise ExportError(f"{path.name} is {err}; train at a lower density") from None
        result = _gate(path, x, reference, limit)
        parity.update(onnx_vs_torch_max_abs=result.max_abs, argmax_agree=result.argmax_agree)
    return source.model, parity, extra


def _onnx_sizes(work: Path) -> dict:
    """Parameters and MACs counted on each ONNX file itself, which opening compares."""
    names_here = sorted(file.name for file in work.iterdir())
    return {name: sizes.record() for name, sizes in measure_onnx_files(work, names_here).items()}


def _size_figures(source: SourceRun, deployed: nn.Module) -> dict:
    """Parameters and MACs by `sizes.size_figures`, the counter run.json uses too."""
    irregular = source.granularity is Granularity.IRREGULAR
    return size_figures(source.model, deployed, source.example,
                        source.masks if irregular else None)


# The weights a self-contained ONNX file can take: protobuf's limit less room for the graph.
ONNX_WEIGHT_LIMIT_BYTES = onnx_io.PROTOBUF_LIMIT_BYTES - 2**27


def _write_onnx(model: nn.Module, example: torch.Tensor, path: Path, config,
                sparsified: bool = False) -> bool:
    """Export `model` to `path`; True if its weights went to external data first.

    A deploy dir holds self-contained ONNX files, which protobuf caps at 2 GiB. Weights over
    that (torchvision's regnet_y_128gf: 2.6 GB) can only ship as sparse initializers, so an
    irregular export (`sparsified`) writes them as external data and `sparsify_initializers`
    folds the nonzeros back in; a dense network that large is refused.

    Raises:
        ExportError: a dense network whose weights exceed the limit.
    """
    size = onnx_io.tensor_bytes(model)
    external = size > ONNX_WEIGHT_LIMIT_BYTES
    if external and not sparsified:
        raise ExportError(
            f"{path.name} would hold {size / 2**30:.2f} GiB of weights, and an ONNX file holds "
            "at most 2 GiB without external data, which deploy dirs do not use; export a "
            "channel run of lower density or an irregular run (sparse weights)")
    onnx_io.export_onnx(model, example, path, config.opset, external_data=external)
    return external



def _gate(path: Path, x: torch.Tensor, reference: np.ndarray,
          limit: ParityLimit) -> onnx_io.Parity:
    """onnx.checker, then ONNX Runtime against the masked PyTorch network.

    Raises:
        ExportCheckFailed: invalid ONNX, a logit further than `limit` (`dnr_deploy.parity`),
            or a different argmax.
    """
    import onnx

    try:
        onnx_io.check_onnx(path)
    except onnx.checker.ValidationError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "invalid"
        raise ExportCheckFailed(f"{path.name} fails onnx.checker: {first}") from None
    result = onnx_io.compare_logits(reference, onnx_io.run_session(onnx_io.open_session(path), x))
    if not result.passes(limit.limit):
        raise ExportCheckFailed(
            f"parity gate failed for {path.name}: ONNX Runtime differs from PyTorch by up to "
            f"{result.max_abs:.3g} ({limit.describe()}), same argmax on "
            f"{result.argmax_agree}/{result.n_images} test images; nothing was written"
        )
    return result


def _check_finite(reference: np.ndarray) -> None:
    """Raises:
        ExportCheckFailed: the network's own logits overflow float32 on some test image, so
            no artifact could match them and none is worth shipping."""
    bad = int((~np.isfinite(reference).all(axis=1)).sum())
    if bad:
        raise ExportCheckFailed(
            f"the trained network's logits are not finite (inf or NaN) on {bad} of "
            f"{len(reference)} test images in eval mode: its activations overflow float32, "
            "typical of a run too short for its batch-norm statistics; train longer or with a "
            "lower --lr; nothing was written")


def _api_test_split(run: dict, test_data: object):
    from dnr_deploy.compress.byo import api_test_split

    return api_test_split((run.get("config") or {}).get("dataset", ""), test_data)


def _load_bundle(run: dict, config: ExportConfig):
    """The run's dataset (DataError says what to put where)."""
    settings = run.get("config") or {}
    try:
        dataset = parse_dataset(str(settings.get("dataset")))
    except ValueError as err:
        raise ExportError(f"run.json: {err}") from None
    return load_trained_data(dataset.value, config.data_dir or settings.get("data_dir"),
                             run.get("dataset"), run.get("input_shape"), run.get("mean"),
                             run.get("std"), with_train=config.quantize is not None)


def _quantize(work: Path, bundle, x: torch.Tensor, y: torch.Tensor, reference: np.ndarray,
              config: ExportConfig, dense: Path | None = None) -> dict:
    """model.onnx -> model.fp32.onnx plus its int8 form as model.onnx, gated twice: the fused
    int8 kernels against ONNX Runtime's reference int8 math, and clean accuracy against float.

    Raises:
        ExportCheckFailed: either gate failed.
    """
    from dnr_deploy.export import quantize

    fp32, int8 = work / names.FP32_MODEL_FILE, work / names.MODEL_FILE
    os.replace(int8, fp32)
    count = min(config.calibration_images, len(bundle.train))
    calibration = torch.stack([bundle.train[i][0] for i in range(count)]).numpy()
    choice = quantize.choose_reduce_range(config.reduce_range)
    # an irregular run's model.onnx has sparse initializers, which the quantizer cannot read
    quantize.quantize_int8(dense or fp32, int8, calibration, choice.reduce_range)
    deployed = onnx_io.run_session(onnx_io.open_session(int8), x)
    drift = onnx_io.compare_logits(
        onnx_io.run_session(quantize.reference_session(int8), x), deployed).max_abs
    if not drift <= config.int8_atol:
        raise ExportCheckFailed(
            f"the int8 session differs from ONNX Runtime's reference int8 math by up to "
            f"{drift:.3g} logits (limit {config.int8_atol:g}; reduce_range {choice.reason}); "
            "try --reduce-range on; nothing was written")
    labels = y.numpy()
    # the float graph passed the parity gate: same argmax as `reference` on every image
    clean_fp32 = float((reference.argmax(1) == labels).mean())
    clean_int8 = float((deployed.argmax(1) == labels).mean())
    if 100 * (clean_fp32 - clean_int8) > config.int8_max_drop:
        raise ExportCheckFailed(
            f"int8 clean accuracy {100 * clean_int8:.2f}% is more than "
            f"{config.int8_max_drop:g} points below float's {100 * clean_fp32:.2f}% on "
            f"{len(labels)} test images; nothing was written")
    return {"dtype": "int8", "format": "QDQ", "weights": "int8 per output channel",
            "activations": "uint8, MinMax calibration", "calibration_images": count,
            "calibration_split": "train", "reduce_range": choice.reduce_range,
            "reduce_range_reason": choice.reason, "float_file": names.FP32_MODEL_FILE,
            "int8_vs_reference_max_abs": drift, "int8_atol": config.int8_atol,
            "clean_float": clean_fp32, "clean_int8": clean_int8, "images": len(labels)}


def _is_within(inner: Path, outer: Path) -> bool:
    inner, outer = inner.resolve(), outer.resolve()
    return inner == outer or outer in inner.parents


def _check_out(out: Path, run_dir: Path, force: bool) -> None:
    if _is_within(run_dir, out):
        raise ExportError(f"--out {str(out)!r} holds the run dir itself; choose another folder")
    occupied = out.is_symlink() or out.exists() and (not out.is_dir() or any(out.iterdir()))
    if occupied and not force:
        raise ExportError(f"--out {str(out)!r} exists and is not empty; "
                          "pass --force to replace it")
    if occupied:
        try:
            manifest.check_replaceable(out)
        except manifest.ManifestError as err:
            raise ExportError(str(err)) from None


