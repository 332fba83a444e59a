"""Hostile files: a pickle payload in a checkpoint or a CSR bundle and a code-running YAML tag
are refused with one clean line, and the payload never runs (its marker file never appears).
Each payload is shown to be live at the end: unsafe loading of the same file does create the
marker. The real entry points are run as subprocesses here too, not only in-process."""

from __future__ import annotations

import json
import pickle
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from dnr_deploy.cli import compress_main, export_main
from dnr_deploy.compress import checkpoint as ckpt
from dnr_deploy.compress.checkpoint import CheckpointError, load_checkpoint
from dnr_deploy.deploydir import names
from dnr_deploy.deploydir.manifest import MANIFEST_FORMAT, MANIFEST_NAME, ManifestError
from dnr_deploy.export import csr, load_deployed_model
from tests.factories import make_deploy_dir, write_fake_run
from tests.helpers import assert_clean_failure, run_cli
from tests.reliability_support import assert_clean_error, call_main, rehash


class Payload:
    """Unpickling this object runs code: it creates the file `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def hostile_yaml(marker: Path) -> str:
    return f"epochs: !!python/object/apply:builtins.exec [\"open({str(marker)!r}, 'w').close()\"]\n"


def checkpoint_with_payload(path: Path, marker: Path, kind: str) -> None:
    """A file shaped like a checkpoint whose unpickling would run the payload."""
    state = {"format": ckpt.CHECKPOINT_FORMAT, "epoch": 1, "config": {}, "optimizer": {},
             "policy": {}, "rng": {}, "history": [], "model": {"0.mean": Payload(marker)}}
    if kind == "zip":
        torch.save(state, path)
    elif kind == "legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    else:  # a bare pickle
        path.write_bytes(pickle.dumps(state))


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "PAYLOAD-RAN"


@pytest.mark.parametrize("kind", ["zip", "legacy", "pickle"])
def test_checkpoint_payload_is_refused_and_never_runs(kind, tmp_path, marker, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    write_fake_run(run_dir, "irregular")
    file = run_dir / ckpt.CHECKPOINT_NAME
    checkpoint_with_payload(file, marker, kind)

    with pytest.raises(CheckpointError, match="refusing to unpickle|cannot read"):
        load_checkpoint(file)
    outcome = call_main(compress_main, ["--resume", str(file)])
    assert_clean_error(outcome.code, outcome.err, "dnr-compress")
    outcome = call_main(export_main, [str(run_dir)])
    assert_clean_error(outcome.code, outcome.err, "dnr-export")
    assert not marker.exists()
    assert not (run_dir / "deploy").exists()

    if kind == "pickle":  # the payload is live: unsafe loading runs it
        pickle.loads(file.read_bytes())
    else:
        torch.load(file, weights_only=False)
    assert marker.exists()


def minimal_deploy_dir(folder: Path, files: dict[str, bytes]) -> Path:
    """A deploy dir holding `files` and a manifest that lists them (sha256 included)."""
    folder.mkdir()
    for name, content in files.items():
        (folder / name).write_bytes(content)
    info = {"format": MANIFEST_FORMAT, "model": {"name": "small", "num_classes": 10,
                                                 "in_chans": 1},
            "input_shape": [1, 8, 8], "num_classes": 10, "mean": [0.3], "std": [0.4],
            "granularity": "irregular", "files": {}}
    (folder / MANIFEST_NAME).write_text(json.dumps(info))
    for name in files:
        rehash(folder, name)
    return folder


def npz_with_payload(marker: Path, name: str) -> bytes:
    import io

    buffer = io.BytesIO()
    payload = np.array([Payload(marker)], dtype=object)
    np.savez(buffer, **{name: payload})  # np.savez pickles object arrays
    return buffer.getvalue()


def test_csr_bundle_payload_is_refused_and_never_runs(tmp_path, marker):
    bundle = npz_with_payload(marker, "header")
    deploy = minimal_deploy_dir(tmp_path / "deploy", {names.CSR_FILE: bundle})
    with pytest.raises(ManifestError, match="CSR bundle"):
        load_deployed_model(deploy)
    with pytest.raises(csr.CsrError):
        csr.read_csr_bundle(deploy / names.CSR_FILE)
    (deploy / names.CSR_FILE).write_bytes(pickle.dumps(Payload(marker)))  # a bare pickle
    rehash(deploy, names.CSR_FILE)
    with pytest.raises(ManifestError, match="not an .npz"):
        load_deployed_model(deploy)
    assert not marker.exists()

    (tmp_path / "live.npz").write_bytes(bundle)
    np.load(tmp_path / "live.npz", allow_pickle=True)["header"]  # unsafe loading runs it
    assert marker.exists()


def test_channel_weights_payload_is_refused_and_never_runs(tmp_path, marker):
    files = {names.WEIGHTS_FILE: npz_with_payload(marker, "1.0.weight"),
             names.HISTORY_FILE: b"[]"}
    deploy = minimal_deploy_dir(tmp_path / "deploy", files)
    with pytest.raises(ManifestError):
        load_deployed_model(deploy)
    assert not marker.exists()


@pytest.mark.parametrize("stage", ["compress", "export"])
def test_yaml_payload_is_refused_and_never_runs(stage, tmp_path, marker, monkeypatch):
    import yaml

    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(hostile_yaml(marker))
    write_fake_run(tmp_path / "run", "irregular")
    main, prog = (compress_main, "dnr-compress") if stage == "compress" else (export_main,
                                                                              "dnr-export")
    argv = ["--config", str(recipe)] + ([str(tmp_path / "run")] if stage == "export" else [])
    line = assert_clean_error(*_code_err(call_main(main, argv)), prog)
    assert "not valid YAML" in line
    assert not marker.exists()
    assert not (tmp_path / "runs").exists() and not (tmp_path / "run" / "deploy").exists()

    yaml.unsafe_load(recipe.read_text())  # the payload is live: unsafe loading runs it
    assert marker.exists()


def _code_err(outcome) -> tuple:
    return outcome.code, outcome.err


@pytest.mark.slow
@pytest.mark.ci
def test_real_entry_points_refuse_hostile_files(tmp_path, marker):
    """The installed commands as a shell runs them: one line, exit 2, no payload, no
    traceback (the in-process tests cannot see output written straight to the terminal)."""
    run_dir = tmp_path / "run"
    write_fake_run(run_dir, "irregular")
    evil = tmp_path / "evil.pt"
    checkpoint_with_payload(evil, marker, "zip")
    (tmp_path / "evil.yaml").write_text(hostile_yaml(marker))
    # A consistent deploy dir whose model.onnx parses but names an op no runtime has: the
    # error comes from inside ONNX Runtime, which logs to the terminal on its own.
    deploy = make_deploy_dir(tmp_path / "deploy")
    model = onnx.load(str(deploy / "model.onnx"))
    model.graph.node[3].op_type = "NoSuchOp"
    onnx.save(model, str(deploy / "model.onnx"))
    rehash(deploy, "model.onnx")
    commands = (["compress", "--resume", str(evil)],
                ["export", str(run_dir), "--config", str(tmp_path / "evil.yaml")],
                ["verify", str(deploy), "--n", "8", "--steps", "1"])
    with ThreadPoolExecutor(max_workers=2) as pool:  # two at a time: the import dominates
        for result in pool.map(lambda args: run_cli(args, tmp_path), commands):
            assert_clean_failure(result, 2)
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deploy", "deploy_run", "evil.pt",
                                                          "evil.yaml", "run"]
    assert not (deploy / "reports").exists()


def zip_bomb(path: Path, members: dict[str, bytes], bomb: str, npy: bool = False) -> None:
    """A zip archive holding `members` and one deflated member `bomb` of 64 MiB of zeros
    (an .npy array header first when `npy`): some 64 KiB on disk."""
    size = 64 << 20
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
        with archive.open(bomb, "w", force_zip64=True) as member:
            if npy:
                header = {"descr": "<f4", "fortran_order": False, "shape": (size // 4,)}
                np.lib.format.write_array_header_1_0(member, header)
            for _ in range(size >> 20):
                member.write(bytes(1 << 20))


def test_zip_bombs_are_refused_before_inflating(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bomb = tmp_path / "bomb.pt"
    zip_bomb(bomb, {"archive/data.pkl": pickle.dumps({}), "archive/version": b"3\n"},
             "archive/data/0")
    assert bomb.stat().st_size < (1 << 20)
    with pytest.raises(CheckpointError, match="would inflate"):
        load_checkpoint(bomb)
    outcome = call_main(compress_main, ["--resume", str(bomb)])
    assert "would inflate" in assert_clean_error(outcome.code, outcome.err, "dnr-compress")

    bundle = tmp_path / "bundle.npz"
    zip_bomb(bundle, {}, "dense/0.mean.npy", npy=True)
    deploy = minimal_deploy_dir(tmp_path / "deploy", {names.CSR_FILE: bundle.read_bytes()})
    with pytest.raises(ManifestError, match="would inflate"):
        load_deployed_model(deploy)
