"""Opening a deploy dir for bench and verify: find it, check every file, find its test data.

A deploy dir is trusted only after each file its manifest lists matches the recorded sha256
(`dnr_deploy.deploydir.manifest.verify_files`). Reports (bench.json, verify.json, plots) are
outputs, not artifacts: they go to a `reports/` folder inside the deploy dir (or `--out`), which
the manifest never lists, so the artifact files themselves are never touched after export.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dnr_deploy.compress import checkpoint as ckpt
from dnr_deploy.deploydir.manifest import ManifestError, load_manifest, verify_files
from dnr_deploy.deploydir.names import DEFAULT_OUT, REPORTS_DIR
from dnr_deploy.deploydir.signing import check_signature
from dnr_deploy.files import artifact_file

if TYPE_CHECKING:
    from dnr_deploy.deploydir.graph_sizes import GraphSizes


class DeployDirError(ValueError):
    """Not a usable deploy dir, or not enough information to score it."""


class SourceRunWarning(RuntimeWarning):
    """The source run's run.json changed after export (only its dataset name is read)."""


@dataclass(frozen=True)
class DeployDir:
    """A deploy dir whose listed files all matched their sha256 when it was opened."""

    path: Path
    manifest: dict
    signature: dict | None = None  # `signing.check_signature`'s finding, for reports
    graphs: dict[str, GraphSizes] = field(default_factory=dict)  # per ONNX file, checked

    def file(self, name: str) -> Path:
        """Raises:
            DeployDirError: the manifest does not list `name`."""
        if name not in self.manifest["files"]:
            listed = ", ".join(sorted(self.manifest["files"])) or "nothing"
            raise DeployDirError(f"{str(self.path)!r} has no {name} (its manifest lists {listed}); "
                                 "export the run with --format onnx")
        return artifact_file(self.path, name, DeployDirError)

    def has(self, name: str) -> bool:
        return name in self.manifest["files"]


def resolve_deploy_dir(path: str | Path | None) -> Path:
    """`path`, or the deploy dir of the run `dnr-compress` wrote last from this folder.

    Raises:
        DeployDirError: no path given and no latest run with a deploy dir.
    """
    if path:
        return Path(path)
    try:
        run_dir = ckpt.latest_run()
    except ckpt.CheckpointError as err:
        raise DeployDirError(f"no deploy dir given: {err}") from None
    candidate = run_dir / DEFAULT_OUT
    if candidate.is_symlink():  # the latest run's own deploy dir, not one a link points to
        raise DeployDirError(f"{str(candidate)!r} is a symbolic link; name the deploy dir")
    if not candidate.is_dir():
        raise DeployDirError(f"no deploy dir given and the latest run {str(run_dir)!r} has no "
                             f"{DEFAULT_OUT}/; run dnr-export first or name a deploy dir")
    return candidate


def open_deploy_dir(path: str | Path | None, verify_key: str | Path | None = None) -> DeployDir:
    """Check the signature (with `verify_key`; else one notice), load the manifest and check
    every listed file against its sha256, before any loading.

    Raises:
        DeployDirError: no such folder.
        ManifestError: no or unreadable manifest, or a file missing or changed after export.
        SignatureError (a ManifestError): with `verify_key`, no valid signature over every file.
        GraphCheckError (a ManifestError): an ONNX file that fails the graph checks or that
            the manifest does not describe (`deploydir.cross_check`).
    """
    from dnr_deploy.deploydir.cross_check import check_deploy_graphs  # onnx: when opened

    folder = resolve_deploy_dir(path)
    if not folder.exists():
        raise DeployDirError(f"deploy dir {str(folder)!r} does not exist")
    # a key: the signature first, so nothing unsigned is even parsed; no key: the notice
    # once the dir is otherwise accepted (a refused dir gets its one error line alone)
    signature = check_signature(folder, verify_key) if verify_key is not None else None
    manifest = load_manifest(folder)
    if not isinstance(manifest.get("files"), dict):
        raise ManifestError(f"{str(folder)!r}: manifest 'files' is not a table; re-export the run")
    verify_files(folder, manifest)
    graphs = check_deploy_graphs(folder, manifest)  # before the notice, as every refusal
    return DeployDir(folder, manifest, signature or check_signature(folder, None), graphs)


def reports_dir(deploy: DeployDir, out: str | None) -> Path:
    """Where bench and verify write their reports: `out`, else DEPLOY_DIR/reports (a real
    folder inside the deploy dir, never a link that would send the writes elsewhere).

    Raises:
        DeployDirError: DEPLOY_DIR/reports is a symbolic link or not a folder.
    """
    if out:
        return Path(out)
    folder = deploy.path / REPORTS_DIR
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise DeployDirError(f"{str(folder)!r} is a symbolic link or not a folder; bench and "
                             "verify write only inside the deploy dir: pass --out")
    return folder


@dataclass(frozen=True)
class DataSource:
    """Which test split scores a deploy dir, and where that choice came from."""

    dataset: str
    data_dir: str | None
    origin: str  # "--dataset", "manifest" or "source run.json"
    record: dict | None = None  # an image folder's "dataset" entry (image_folder.record)

    def load(self, manifest: dict):
        """The DataBundle of this test split, at the deployed model's input shape.

        Raises:
            DataError: as `data.load_trained_data`.
        """
        from dnr_deploy.data import load_trained_data

        return load_trained_data(self.dataset, self.data_dir, self.record,
                                 manifest["input_shape"], manifest.get("mean"),
                                 manifest.get("std"))


def find_dataset(deploy: DeployDir, dataset: str | None, data_dir: str | None) -> DataSource:
    """The dataset the deployed model was trained on.

    From `dataset` (the user's flag), else the manifest's "dataset" (so a deploy dir moved
    away from its run verifies), else, for manifests written before it was recorded, the source
    run's run.json when that folder is reachable. The dataset's input shape and class count
    must match the manifest's.

    Raises:
        DeployDirError: no flag and no record of the dataset, or a dataset that does not fit.
    """
    origin = "--dataset"
    recorded = deploy.manifest.get("dataset") or {}
    folder = recorded if recorded.get("name") == "folder" and dataset in (None, "folder") \
        else None
    if not dataset and recorded.get("name"):
        dataset, origin = recorded["name"], "manifest"
        data_dir = data_dir or recorded.get("data_dir")
    if not dataset:
        run = _source_run_json(deploy)
        settings = (run or {}).get("config") or {}
        if not settings.get("dataset"):
            raise DeployDirError(
                f"cannot tell which dataset {str(deploy.path)!r} was trained on: its source "
                "run's run.json is not reachable; pass --dataset (and --data-dir)"
            )
        dataset, origin = settings["dataset"], "source run.json"
        data_dir = data_dir or settings.get("data_dir")
    try:  # torch: only when verify needs it
        from dnr_deploy.data import SPECS, parse_dataset
        from dnr_deploy.data.folder import recorded_folder_spec

        if dataset == "folder" and folder is None:  # --dataset folder on another run's deploy
            return DataSource(dataset, data_dir, origin)  # dir: the model's shape, any classes
        spec = recorded_folder_spec(folder) if dataset == "folder" else \
            SPECS[parse_dataset(dataset)]
    except ValueError as err:
        raise DeployDirError(str(err)) from None
    shape = [int(n) for n in deploy.manifest["input_shape"]]
    if list(spec.input_shape) != shape or spec.num_classes != int(deploy.manifest["num_classes"]):
        raise DeployDirError(
            f"dataset {dataset!r} has {list(spec.input_shape)} images and {spec.num_classes} "
            f"classes, the deployed model takes {shape} and has {deploy.manifest['num_classes']}"
        )
    return DataSource(dataset, data_dir, origin, folder)


def source_run_dir(deploy_dir: Path, recorded: object) -> Path | None:
    """The run dir a manifest's source_run.dir names, when it may be read: a real folder that
    is the deploy dir's own parent (RUN_DIR/deploy) or a sibling of it, holding a regular
    run.json. Anything else (a path elsewhere, a link) is None: a manifest points nowhere."""
    if not isinstance(recorded, str) or not recorded:
        return None
    source = Path(recorded)
    if source.is_symlink() or not source.is_dir():
        return None
    real, home = source.resolve(), Path(deploy_dir).resolve()
    if real != home.parent and real.parent != home.parent:
        return None
    try:
        return source if artifact_file(source, ckpt.RUN_JSON, DeployDirError).is_file() else None
    except DeployDirError:
        return None


def _source_run_json(deploy: DeployDir) -> dict | None:
    source = deploy.manifest.get("source_run") or {}
    run_dir = source_run_dir(deploy.path, source.get("dir"))
    if run_dir is None:
        return None
    try:
        run = ckpt.read_run_json(run_dir)
    except ckpt.CheckpointError:
        return None
    recorded = source.get("run_json_sha256")
    if recorded and ckpt.sha256_of(run_dir / ckpt.RUN_JSON) != recorded:
        warnings.warn(
            f"{str(run_dir / ckpt.RUN_JSON)!r} changed since export; reading only its dataset "
            "name from it (pass --dataset to say it yourself)", SourceRunWarning, stacklevel=3,
        )
    return run
